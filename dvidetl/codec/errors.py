"""The one exception the codec raises for malformed input."""

from __future__ import annotations


class BlockFormatError(ValueError):
    """A DVID block (or its storage wrapper) is malformed.

    The message says what is wrong and at which byte, so a corrupt block in a multi-terabyte
    export can be diagnosed from a log line alone. ``offset`` is that byte offset (into the
    unwrapped block for block errors, into the wrapped value for wrapper errors) or None.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
