"""The one error type users see: a single line that names the problem and the fix."""


class RetrofitError(ValueError):
    """Bad input to retrofit. The message is one line: what is wrong and how to fix it.

    The CLI prints it without a traceback; the Python API lets it propagate.
    """


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name if empty), short enough for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
