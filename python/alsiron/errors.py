"""Exceptions that reach the user as one actionable line.

:class:`AlsironError` is the base of every error the command line prints without a
traceback; anything else is a bug.
"""

from __future__ import annotations

from os import PathLike


class AlsironError(Exception):
    """An error caused by the input or the options, reported as one line."""


class InputError(AlsironError):
    """Bad input data: the message names the file and what is wrong with it."""

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class OutputExistsError(AlsironError):
    """An output already exists and overwriting was not requested."""
