"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one line."""


class UserError(Exception):
    """A bad option, URL, ticket or input file: the message says what to fix (no traceback)."""


class SourceUnavailable(Exception):
    """The data behind a source (a DVID server, a file system) failed or could not be reached.

    Not a `UserError`: the request was fine, the backend was not. The Flight server answers it
    UNAVAILABLE so workers retry (elsewhere or later) instead of treating it as a bad ticket;
    the CLI still prints it as one line.
    """


def drop_background(sv, body, where: str):
    """Drop mapping pairs of supervoxel 0 (background), logging how many and why.

    DVID never maps supervoxel 0 (it is not a segment); a pair for it in a mapping file is an
    error in whatever wrote it, and honouring it would paint every background voxel as a body.
    Returns the filtered ``(sv, body)`` arrays.
    """
    import logging

    import numpy as np

    zero = np.asarray(sv) == 0
    if zero.any():
        bad = np.unique(np.asarray(body)[zero])
        logging.getLogger("dvidetl.mapping").warning(
            "%s: dropped %d mapping pair(s) for supervoxel 0 (background; DVID never maps it) "
            "to bodies %s", where, int(zero.sum()), [int(b) for b in bad[:10]],
        )
        return np.asarray(sv)[~zero], np.asarray(body)[~zero]
    return sv, body
