"""Progress output that reads well on a terminal and in a log file (a redirected run, a Ray job's or a pod's log)."""
from __future__ import annotations

import io
import logging
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # between progress lines in a log, where every refresh is kept


class _LineStream(io.TextIOBase):
    """tqdm redraws its bar in place with carriage returns; in a log they pile up into one endless line. This stream
    writes each redraw as a line of its own."""

    def __init__(self, stream: TextIO):
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def progress_bar(enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: redrawn every second on a terminal, else a line every :data:`LOG_INTERVAL_S` seconds."""
    if sys.stderr.isatty():
        return tqdm(disable=not enabled, mininterval=1.0, **kwargs)
    return tqdm(disable=not enabled, file=_LineStream(sys.stderr), mininterval=LOG_INTERVAL_S, **kwargs)


# The loggers of this project's packages: what they log at INFO is the console output of a command.
PROJECT_LOGGERS = ("spai_core", "pipelines", "tune", "spai_cli")


class _ConsoleHandler(logging.Handler):
    """INFO lines as plain text on stdout (what a job reports); warnings and errors on stderr, marked as such."""

    def emit(self, record: logging.LogRecord) -> None:
        # Written to the stream, not print()ed: in a Ray Train worker print() goes to Train's logger and, since Ray
        # wraps the worker's stdout, to the stream as well, so every line would reach the driver twice.
        try:
            message = self.format(record)
            warning = record.levelno >= logging.WARNING
            stream = sys.stderr if warning else sys.stdout
            stream.write(f"{record.levelname.lower()}: {message}\n" if warning else f"{message}\n")
            stream.flush()
        except Exception:  # logging must never take a job down
            self.handleError(record)


def log_to_console(level: int = logging.INFO) -> None:
    """Show the project's log records at ``level`` and above on the console; idempotent (one handler per process).

    The CLI calls this in its process; Ray workers that report to the user (rank 0 of training) call it too, since a
    worker process starts with no handlers and Ray forwards its stdout and stderr to the driver.
    """
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            logger.addHandler(_ConsoleHandler())
