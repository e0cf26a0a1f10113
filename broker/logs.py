"""Log output: plain text for a terminal, or one JSON object per line for a log pipeline.

:func:`logging_config` is the one ``logging.config.dictConfig`` setup of a broker process: every
record of the broker, uvicorn (error and access), granian and libraries goes to stderr in the
configured format (``log_format``, ``nhi-broker serve --log-format``). ``nhi-broker serve`` hands it
to uvicorn and granian, which apply it in every worker process.

In ``json`` every record is a single line with ``time`` (RFC 3339, UTC), ``level``, ``logger``,
``message``, ``pid`` (which worker process) and the ``trace_id``/``span_id`` of the request being
served (:mod:`broker.tracing`), so a log line, a trace and a ledger entry can be joined on the trace
id; an access line also has ``http_method``, ``url_path``, ``status`` and ``client``.

The broker never logs a token or a secret (tests/ops/test_observability.py greps a real ``serve``
process's logs for the tokens it was sent). Two records could carry one from outside the broker's
code, and are cut at the handler: a request target's query string (a client that puts
``?access_token=`` in a URL) is logged with its parameter names and numeric values only, and
httpx's per-request INFO lines (a webhook URL can embed a secret) are not logged below WARNING.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from typing import Any
from urllib.parse import parse_qsl

from broker.tracing import current_trace

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "RedactQueryStrings",
    "TextFormatter",
    "configure_logging",
    "log_fast",
    "logging_config",
]

LOG_FORMATS = ("text", "json")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are the record itself, not extra fields a caller attached; uvicorn's
# ``color_message`` is the message again with terminal colours.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "color_message"}
_ACCESS_LOGGER = "uvicorn.access"
_NUMBER = re.compile(r"[0-9]{1,20}")
# json.dumps(out, ensure_ascii=False, separators=(",", ":")) without a new encoder for every record.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def log_fast(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` for a line written on every request: the same record to the same
    handlers, without the stack walk that finds the caller's file and line (no broker format shows them;
    the record says ``(unknown file)`` as with ``logging._srcfile = None``)."""
    if logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, args, None,
                                        "(unknown function)"))


_utc_second: tuple[int, str] = (-1, "")  # the last second _utc_millis formatted, and its text


def _utc_millis(created: float) -> str:
    """``datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")``, the date and time
    of day formatted once per second: the same rounding (to the microsecond, half to even) and text."""
    global _utc_second
    fraction, whole = math.modf(created)
    micros = round(fraction * 1e6)
    second = int(whole)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    cached = _utc_second
    if cached[0] != second:
        cached = _utc_second = (second, dt.datetime.fromtimestamp(second, tz=dt.UTC).isoformat()[:-6])
    return f"{cached[1]}.{micros // 1000:03d}+00:00"


def redact_target(target: str) -> str:
    """A request target with its query values cut, but numbers (a ledger range, a tree size) kept:
    ``/p?access_token=abc&start=5`` -> ``/p?access_token=&start=5``."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = "&".join(f"{name[:64]}={value if _NUMBER.fullmatch(value) else ''}" for name, value in pairs)
    return f"{path}?{kept}" if kept else path


class RedactQueryStrings(logging.Filter):
    """Cuts the query values out of uvicorn's access records (``args[2]`` is the request target)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            args = list(record.args)
            if isinstance(args[2], str):
                args[2] = redact_target(args[2])
                record.args = tuple(args)
        return True


class TextFormatter(logging.Formatter):
    """The text format (``%(asctime)s %(levelname)s %(name)s: %(message)s``), its time's date and
    seconds formatted once per second (``logging.Formatter.formatTime`` calls ``strftime`` per record)."""

    def __init__(self, fmt: str = _TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime(self.default_time_format, self.converter(record.created)))
            self._second = cached
        msec_format = self.default_msec_format
        return cached[1] if msec_format is None else msec_format % (cached[1], record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _utc_millis(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        trace = current_trace.get()
        if trace is not None:
            out["trace_id"] = trace.trace_id
            out["span_id"] = trace.span_id
        if record.name == _ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, target, _version, status = record.args
            out.update(http_method=method, url_path=target, status=status, client=client)
        attributes = vars(record)
        if not attributes.keys() <= _RESERVED:  # extra fields (most records have none)
            for key, value in attributes.items():
                if key not in _RESERVED and not key.startswith("_"):
                    out[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            # The exception's type; a traceback (and a message that may quote input) is for a debugger.
            out["error"] = f"{record.exc_info[0].__name__ if record.exc_info[0] else 'Exception'}"
        return _JSON_ENCODER.encode(out)


def logging_config(log_format: str = "text", level: str = "INFO") -> dict[str, Any]:
    """The ``dictConfig`` of a broker process: one stderr handler on the root logger, in ``log_format``.

    uvicorn's and granian's loggers keep no handler of their own and propagate to it, so their lines
    have the same format (and, in ``json``, the request's trace ids).
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    formatter: dict[str, Any] = ({"()": "broker.logs.JsonFormatter"} if log_format == "json"
                                 else {"()": "broker.logs.TextFormatter"})
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"broker": formatter},
        "filters": {"redact": {"()": "broker.logs.RedactQueryStrings"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "broker", "filters": ["redact"]}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": propagate, "uvicorn.error": propagate, "uvicorn.access": propagate,
            "_granian": propagate, "granian.access": propagate,
            "httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"},
        },
    }


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Route every logger (the broker's, uvicorn's, libraries') to stderr in ``log_format``."""
    import logging.config

    logging.config.dictConfig(logging_config(log_format, logging.getLevelName(level)))
