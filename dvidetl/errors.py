"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one line."""


class UserError(Exception):
    """A bad option, URL, ticket or input file: the message says what to fix (no traceback)."""
