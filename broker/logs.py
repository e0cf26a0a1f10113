"""Log output: plain text for a terminal, or one JSON object per line for a log pipeline.

``configure_logging("json")`` makes every record of the broker, uvicorn and libraries a single
line of JSON with ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, and the
``trace_id``/``span_id`` of the request being served (:mod:`broker.tracing`), so a log line, a
trace and a ledger entry can be joined on the trace id. The broker never logs a token or a secret;
this formatter adds nothing from the request but the trace ids.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from broker.tracing import current_trace

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging"]

LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are the record itself, not extra fields a caller attached.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace = current_trace.get()
        if trace is not None:
            out["trace_id"] = trace.trace_id
            out["span_id"] = trace.span_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            # The exception's type and message; a traceback is for a debugger, not a log pipeline.
            out["error"] = f"{record.exc_info[0].__name__ if record.exc_info[0] else 'Exception'}"
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Route every logger (the broker's, uvicorn's, libraries') to stderr in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
