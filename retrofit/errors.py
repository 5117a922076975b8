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
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]  # "Error(s) in ...:"
    return text[:limit]


def check_settings(checks: Iterable[tuple[bool, str]], owner: str) -> None:
    """Raise one line for the first failed ``(ok, problem)`` check, saying where the setting lives."""
    for ok, problem in checks:
        if not ok:
            raise RetrofitError(f"{problem}: fix the {owner} setting.")
