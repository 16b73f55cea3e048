"""The one place secrets are taken out of text: every message, log line, dashboard state and
stored record that may carry a URL or an error from a backend goes through :func:`redact`.

Why a single helper: a credential can reach output by many roads (a URL with ``user:pass@``
typed into ``--sink``, a token echoed in a server's error, an access key in an SDK's
exception) and a filter that only some of them use is a leak waiting for the next road. So
the CLI's one-line errors, every log handler the CLI installs (:class:`RedactingFilter`,
also installed on Dask workers), the dashboard page and the run's failure reasons all call
this.

What is redacted:

* the password of any URL (``scheme://user:secret@host`` -> ``scheme://user:***@host``; a
  userinfo without a colon may be a token: ``scheme://***@host``);
* the value of secret-looking query keys (any key containing ``token``, ``secret``,
  ``password``, ``key``, ``credential``, ``auth``, ``signature``, ...);
* ``Bearer <token>`` and ``authorization: <value>``;
* every value registered with :func:`register_secret` (tokens and keys read from files),
  and the values of the credential environment variables in :data:`SECRET_ENV`.

Imports nothing of dvidetl, so every layer may use it.
"""

from __future__ import annotations

import logging
import os
import re
import threading

MASK = "***"

#: environment variables whose values are credentials wherever they show up
SECRET_ENV = (
    "VASTDB_ACCESS_KEY", "VASTDB_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "DVIDETL_FLIGHT_TOKEN", "DVIDETL_DVID_TOKEN",
)
#: shorter values are not treated as secrets (they would mask ordinary words and numbers)
MIN_SECRET_LEN = 4

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)(?:([^/\s@:'\"<>]*):)?[^/\s@'\"<>]+@")
#: query keys whose values are secrets (matched as substrings, case-insensitive)
SECRET_KEYS = ("token", "secret", "password", "passwd", "pwd", "key", "credential", "auth",
               "signature")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][a-z0-9_.\-]*(?:" + "|".join(SECRET_KEYS) + r")[a-z0-9_.\-]*=)[^&\s'\"<>#]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_AUTH_HEADER = re.compile(r"(?i)(['\"]?authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\s,}]+")

_lock = threading.Lock()
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears from now on (in this process)."""
    if value and len(value) >= MIN_SECRET_LEN:
        with _lock:
            _registered.add(value)


def _secrets() -> list[str]:
    env = [os.environ.get(k, "").strip() for k in SECRET_ENV]
    with _lock:
        vals = _registered | {v for v in env if len(v) >= MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)  # longest first: a secret containing another


def redact(text: object) -> str:
    """``text`` (anything; ``str()`` of it) with every credential replaced by ``***``."""
    s = text if isinstance(text, str) else str(text)
    for v in _secrets():
        if v in s:
            s = s.replace(v, MASK)
    s = _URL_USERINFO.sub(lambda m: m.group(1) + (f"{m.group(2)}:" if m.group(2) else "") + MASK + "@", s)
    s = _SECRET_QUERY.sub(lambda m: m.group(1) + MASK, s)
    s = _BEARER.sub(lambda m: m.group(1) + " " + MASK, s)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, s)


def redact_obj(obj):
    """A JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message (arguments merged in) and its traceback text,
    redacted. On a handler, it covers records of every logger that reaches that handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report
            return True
        record.msg, record.args = redact(msg), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction() -> None:
    """Put a :class:`RedactingFilter` on every handler of every logger that exists now (the
    root's, Dask's own, a ``--log-file``'s): no log line leaves the process unredacted."""
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if not any(isinstance(f, RedactingFilter) for f in h.filters):
                h.addFilter(RedactingFilter())
    last = logging.lastResort
    if last is not None and not any(isinstance(f, RedactingFilter) for f in last.filters):
        last.addFilter(RedactingFilter())


__all__ = ["redact", "redact_obj", "register_secret", "RedactingFilter", "install_log_redaction",
           "MASK", "SECRET_ENV"]
