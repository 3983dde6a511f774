"""Logging policy: what may reach the daemon's log, and how often.

Two rules the daemon installs at start:

- **No conversation text in logs.** websockets logs every frame at DEBUG
  (`> TEXT '{"type": "token", "data": ...}'`): prompts, system prompts and
  replies in the clear. The transport loggers are held at INFO whatever the
  daemon's level, so "no plaintext on disk" holds for log files too.
- **Resource exhaustion is reported once per interval.** Out of file
  descriptors (EMFILE/ENFILE) every accept and every open fails; logging each
  with a traceback fills the disk (hundreds of MB in seconds). The first such
  record of an interval passes, with how many were held back since the last one.
"""

from __future__ import annotations

import errno
import logging
import time

#: Loggers that dump frames or bodies at DEBUG.
TRANSPORT_LOGGERS = ("websockets", "websockets.server", "websockets.client", "uvicorn.protocols", "h11", "httpcore")
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_EXHAUSTED_TEXT = ("Too many open files", "out of system resource")


def quiet_transport_frames() -> None:
    """Keep the transports' frame dumps out of the log at every level."""
    for name in TRANSPORT_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def _is_exhaustion(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:
        return True
    try:
        message = record.getMessage()
    except Exception:  # a malformed record is the logging module's business
        return False
    return any(text in message for text in _EXHAUSTED_TEXT)


class ExhaustionFilter(logging.Filter):
    """Let one resource-exhaustion record through per `interval` seconds."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_exhaustion(record):
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        held, self.suppressed = self.suppressed, 0
        first = (record.getMessage().splitlines() or [""])[0]
        exc = record.exc_info[1] if record.exc_info else None
        summary = f"resource exhausted: {first}" + (f" ({exc})" if exc is not None else "")
        if held:
            summary += f" ({held} similar message(s) held back in the last {self.interval:.0f} s)"
        record.msg, record.args, record.exc_info, record.exc_text = summary, None, None, None
        return True


def install(interval: float = 10.0) -> ExhaustionFilter:
    """Apply both rules to the root logger's handlers (call after logging is set up)."""
    quiet_transport_frames()
    flt = ExhaustionFilter(interval)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    return flt
