"""The one error type users see: a single line that names the problem and the fix."""

from __future__ import annotations

from collections.abc import Iterable


class RetrofitError(ValueError):
    """Bad input to retrofit. The message is one line: what is wrong and how to fix it.

    The CLI prints it without a traceback; the Python API lets it propagate.
    """


def first_line(error: BaseException, limit: int = 160, root: bool = False) -> str:
    """The first line of an exception's message (its type name if empty), short enough for a one-line error.

    ``root`` quotes the innermost cause instead: libraries such as datasets wrap the useful message in
    generic ones.
    """
    while root and (error.__cause__ or error.__context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def check_settings(checks: Iterable[tuple[bool, str]], owner: str) -> None:
    """Raise one line for the first failed ``(ok, problem)`` check, saying where the setting lives."""
    for ok, problem in checks:
        if not ok:
            raise RetrofitError(f"{problem}: fix the {owner} setting.")
