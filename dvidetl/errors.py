"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one line."""

from dvidetl.redact import redact


class UserError(Exception):
    """A bad option, URL, ticket or input file: the message says what to fix (no traceback)."""


class SourceUnavailable(Exception):
    """The data behind a source (a DVID server, a file system) failed or could not be reached.

    Not a `UserError`: the request was fine, the backend was not. The Flight server answers it
    UNAVAILABLE so workers retry (elsewhere or later) instead of treating it as a bad ticket;
    the CLI still prints it as one line.
    """


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An error as one short log line (server answers can be pages long), credentials
    redacted (``dvidetl.redact``)."""

    text = redact(str(exc)).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(exc).__name__
