"""Errors a user can cause: one line, no traceback, non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the input or environment that the user can fix.

    `where` names the file (file:line), recipe key or path; `hint` says what
    to do.  str() gives the single line the CLI prints.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        line = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            line += f" ({self.hint})"
        return " ".join(line.split("\n"))


class BuildInterrupted(BaseException):
    """SIGTERM arrived; `phase` says where the build stopped.  Like
    KeyboardInterrupt (SIGINT) it is not an Exception: no `except Exception`
    meant for a library's errors may swallow the request to stop."""

    exit_code = 130

    def __init__(self, signum: int, phase: str):
        super().__init__(f"interrupted by signal {signum} during {phase}")
        self.signum = signum
        self.phase = phase
