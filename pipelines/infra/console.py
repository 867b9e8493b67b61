"""Progress output that reads well on a terminal and in a log file (a redirected run, a Ray job's or a pod's log)."""
from __future__ import annotations

import io
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
