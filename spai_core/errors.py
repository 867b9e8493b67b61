"""The base of errors a user can fix (a path, a flag, a file, a setting), as opposed to bugs.

Each command's error subclasses :class:`UserError` beside the builtin it refines (``ValueError``, ``OSError``...), so
library callers catch either, and the ``spai`` CLI prints the message alone, without a traceback, and exits with 2.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message says what is wrong and what to do."""
