"""The one error type users see: a single line that names the problem and the fix."""


class RetrofitError(ValueError):
    """Bad input to retrofit. The message is one line: what is wrong and how to fix it.

    The CLI prints it without a traceback; the Python API lets it propagate.
    """
