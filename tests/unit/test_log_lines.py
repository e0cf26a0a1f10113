"""broker.logs' per-request savings write what the standard library writes: the text formatter's cached
seconds, the JSON formatter's cached UTC time, and log_fast's record (no caller lookup)."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import random

import pytest

from broker.logs import _TEXT_FORMAT, JsonFormatter, TextFormatter, _utc_millis, log_fast, logging_config
from broker.tracing import TraceContext, current_trace

BOUNDARIES = [
    second + fraction
    for second in (0, 1_700_000_000, 1_800_000_000, 1_800_000_001, 2**31)
    for fraction in (0.0, 0.0004994999, 0.0004995, 0.0005, 0.5, 0.999, 0.9994999, 0.9995, 0.9999994999,
                     0.9999995, 0.9999996)
] + [math.nextafter(1_800_000_001.0, 0.0), math.nextafter(1_800_000_001.0, math.inf)]


def test_utc_millis_is_datetimes_isoformat() -> None:
    rng = random.Random(10)
    values = BOUNDARIES + [rng.uniform(0, 2**33) for _ in range(20000)]
    values += [1_800_000_000 + rng.random() for _ in range(20000)]  # many in one second: the cache
    for created in values:
        assert _utc_millis(created) == dt.datetime.fromtimestamp(created, tz=dt.UTC).isoformat(
            timespec="milliseconds"), created


def record(created: float, msg: str = "issued jti=%s index=%d", args: tuple[object, ...] = ("j", 7)
           ) -> logging.LogRecord:
    made = logging.LogRecord("nhi_broker.pipeline", logging.INFO, __file__, 1, msg, args, None)
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    return made


def test_text_formatter_writes_what_logging_formatter_writes() -> None:
    rng = random.Random(11)
    ours, reference = TextFormatter(), logging.Formatter(_TEXT_FORMAT)
    times = BOUNDARIES + sorted(1_800_000_000 + rng.uniform(0, 5) for _ in range(2000))
    for created in times:
        assert ours.format(record(created)) == reference.format(record(created)), created
    dated = TextFormatter(datefmt="%H:%M")
    assert dated.format(record(1_800_000_000.5)) == logging.Formatter(_TEXT_FORMAT, "%H:%M").format(
        record(1_800_000_000.5))


def test_logging_config_text_uses_the_text_formatter() -> None:
    assert logging_config("text")["formatters"]["broker"] == {"()": "broker.logs.TextFormatter"}


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO, list[logging.LogRecord]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    records: list[logging.LogRecord] = []

    def keep(made: logging.LogRecord) -> bool:
        records.append(made)
        return True

    handler.addFilter(keep)
    logger = logging.getLogger(f"nhi_broker.test_log_fast.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream, records


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_log_fast_writes_the_line_logger_info_writes(formatter: logging.Formatter) -> None:
    logger, stream, records = _capture(formatter)
    args = ("Q4yxNM3voEtevjWM9inz3g", "support-assistant", "orders.read", "orders-read-own-customer", 6199)
    message = "issued jti=%s workload=%s action=%s rule=%s index=%d"
    token = current_trace.set(TraceContext.start([]))
    try:
        logger.info(message, *args)
        log_fast(logger, logging.INFO, message, *args)
    finally:
        current_trace.reset(token)
    first, second = records
    assert (first.name, first.levelno, first.levelname, first.getMessage(), first.process) == (
        second.name, second.levelno, second.levelname, second.getMessage(), second.process)
    assert second.pathname == "(unknown file)" and second.funcName == "(unknown function)"
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if isinstance(formatter, JsonFormatter):
        one, two = (json.loads(line) for line in lines)
        assert list(one) == list(two) and one.pop("time")[:19] == two.pop("time")[:19] and one == two
        assert "trace_id" in one
    else:
        assert lines[0][23:] == lines[1][23:]  # after "YYYY-MM-DD HH:MM:SS,mmm"
        assert lines[1].endswith(" INFO " + logger.name + ": " + message % args)


def test_log_fast_below_the_level_writes_nothing() -> None:
    logger, stream, records = _capture(TextFormatter())
    log_fast(logger, logging.DEBUG, "not %s", "written")
    logger.setLevel(logging.WARNING)
    log_fast(logger, logging.INFO, "not %s", "written")
    assert records == [] and stream.getvalue() == ""


def test_json_extra_fields_keep_their_order_and_reserved_ones_stay_out() -> None:
    logger, stream, _ = _capture(JsonFormatter())
    logger.info("with extras", extra={"rule": "refund-eur", "count": 2, "obj": {"a": 1}, "_private": 1})
    logger.info("without")
    with_extras, without = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(with_extras)[-3:] == ["rule", "count", "obj"] and with_extras["obj"] == "{'a': 1}"
    assert list(without) == ["time", "level", "logger", "message", "pid"]
