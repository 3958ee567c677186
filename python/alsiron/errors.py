"""Exceptions that reach the user as one actionable line.

:class:`AlsironError` is the base of every error the command line prints without a
traceback; anything else (a plain ``ValueError`` included) is a bug and keeps its
traceback.
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


class InvalidInputError(InputError, ValueError):
    """A value of the user's data or options is out of range (echo times, voxel size,
    an empty mask, ...).

    Also a ``ValueError``, so that library callers catching ``ValueError`` for bad
    arguments keep working; the command line reports it as one line like any
    :class:`InputError`.
    """

    def __init__(self, problem: str, path: str | PathLike[str] | None = None) -> None:
        super().__init__(path, problem)


class OutputExistsError(AlsironError):
    """An output already exists and overwriting was not requested."""


class OutputWriteError(AlsironError, OSError):
    """An output cannot be written (disk full, read-only or forbidden folder): the message
    names the file and the system's reason.

    Also an ``OSError`` (with the original ``errno``), so that library callers catching
    ``OSError`` keep working; the command line reports it as one line.
    """

    def __init__(self, path: str | PathLike[str], problem: str,
                 error_number: int | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
        self.errno = error_number


class RegistryError(InputError):
    """The registry cannot be opened or used (corrupted, newer schema, locked, no driver)."""


class RegistrationError(InputError):
    """The template could not be registered to the subject."""
