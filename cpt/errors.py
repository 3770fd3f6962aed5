"""One exception type for every problem a user can fix, so the CLI can print it as one line."""

from __future__ import annotations


class CptError(Exception):
    """A problem in user input: printed as ``error: <where>: <message>`` with exit code 2.

    ``where`` is a file and/or a dotted field path (``recipe.yaml: stages.cpt.mixture``).
    """

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def __reduce__(self):  # a preparation worker's error reaches the parent whole
        return type(self), (self.message, self.where)


class CptErrors(CptError):
    """Several independent problems found at once (validation reports them all)."""

    def __init__(self, errors: list[CptError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors

    def __reduce__(self):
        return type(self), (self.errors,)


def first_line(error: BaseException) -> str:
    """The first line of a library's exception: their messages often run over many lines."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
