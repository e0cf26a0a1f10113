"""authorization_details parsing: each bad input names the error it expects."""

from __future__ import annotations

import json

import pytest

from broker.errors import InvalidAuthorizationDetails
from broker.intent import is_valid_action, is_valid_resource, parse_authorization_details


def _details(**intent: object) -> str:
    return json.dumps([{"type": "intent", **intent}])


def test_valid_intent() -> None:
    intent = parse_authorization_details(
        _details(action="payments.refund", resource="orders/ord-1", context={"amount": 20, "currency": "EUR"})
    )
    assert intent.action == "payments.refund"
    assert intent.resource == "orders/ord-1"
    assert intent.context == {"amount": 20, "currency": "EUR"}
    assert intent.to_json()["type"] == "intent"


BAD_DETAILS = [
    (None, "is required"),
    ("", "is required"),
    ("{", "not valid JSON"),
    ('{"type":"intent"}', "must be a JSON array"),
    ("[]", "exactly one intent"),
    (json.dumps([{"type": "intent", "action": "a.b", "resource": "r"}] * 2), "exactly one intent"),
    ('["x"]', "must be a JSON object"),
    (json.dumps([{"type": "openid", "action": "a", "resource": "r"}]), '"type": "intent"'),
    (_details(action="a.b", resource="r", extra=1), "unknown intent member"),
    (_details(action="Payments.Refund", resource="r"), "action"),
    (_details(action="payments.refund\n", resource="r"), "action"),
    (_details(action="a.b", resource="orders/../admin"), "resource"),
    (_details(action="a.b", resource="orders/./x"), "resource"),
    (_details(action="a.b", resource="/orders"), "resource"),
    (_details(action="a.b", resource="orders/"), "resource"),
    (_details(action="a.b", resource="orders//x"), "resource"),
    (_details(action="a.b", resource="orders/x\n"), "resource"),
    (_details(action="a.b", resource="orders/%2e%2e"), "resource"),
    (_details(action="a.b", resource="a/" * 20 + "b"), "resource"),
    (_details(action="a.b", resource="r", context=[1]), "context must be a JSON object"),
    (_details(action="a.b", resource="r", context={"Amount": 1}), "lower-case identifier"),
    (_details(action="a.b", resource="r", context={"a": {"nested": 1}}), "context.a"),
    (_details(action="a.b", resource="r", context={"a": "x" * 300}), "context.a"),
    (_details(action="a.b", resource="r", context={"a": "new\nline"}), "context.a"),
    (_details(action="a.b", resource="r", context={"a": 2**60}), "exact integer range"),
    ('[{"type":"intent","action":"a.b","resource":"r","context":{"amount":NaN}}]', "not a valid JSON number"),
    ('[{"type":"intent","action":"a.b","resource":"r","context":{"amount":Infinity}}]', "not a valid JSON number"),
    ('[{"type":"intent","action":"a.b","action":"c.d","resource":"r"}]', "duplicate member"),
    ('[{"type":"intent","action":"a.b","resource":"r","context":{"amount":1,"amount":900}}]', "duplicate member"),
    ("[" * 5000 + "]" * 5000, "larger than"),
    (json.dumps([{"type": "intent", "action": "a.b", "resource": "r", "context": {"k": "v" * 200}}]) + " " * 9000,
     "larger than"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_DETAILS)
def test_bad_authorization_details(raw: str | None, message: str) -> None:
    with pytest.raises(InvalidAuthorizationDetails, match=message.replace("(", r"\(")):
        parse_authorization_details(raw)


@pytest.mark.parametrize("action", ["orders.read", "payments.refund", "a", "tickets.update-status"])
def test_valid_actions(action: str) -> None:
    assert is_valid_action(action)


@pytest.mark.parametrize("action", ["", "Orders.read", "orders..read", ".orders", "orders.", "orders.*", "a b", 3])
def test_invalid_actions(action: object) -> None:
    assert not is_valid_action(action)


@pytest.mark.parametrize("resource", ["orders", "customers/c-42/orders/ord-1", "kb/articles/how-to.md", "x:y@z"])
def test_valid_resources(resource: str) -> None:
    assert is_valid_resource(resource)


@pytest.mark.parametrize("resource", ["", "..", ".", "a/..", "a/.hidden", "a/b.", "a\\b", "a b", "a/*", "a?b", None])
def test_invalid_resources(resource: object) -> None:
    assert not is_valid_resource(resource)


def _resource_by_segments(resource: object) -> bool:
    """The segment-by-segment definition is_valid_resource had before it became one expression."""
    from broker.intent import MAX_RESOURCE_LEN, MAX_RESOURCE_SEGMENTS, RESOURCE_SEGMENT_RE

    if not isinstance(resource, str) or not resource or len(resource) > MAX_RESOURCE_LEN:
        return False
    segments = resource.split("/")
    if len(segments) > MAX_RESOURCE_SEGMENTS:
        return False
    return all(RESOURCE_SEGMENT_RE.fullmatch(s) is not None for s in segments)


def test_is_valid_resource_is_the_segment_by_segment_rule() -> None:
    import random

    rng = random.Random(8)
    alphabet = "a/./-_~:@Z09é \x00\n"
    samples: list[object] = [None, 7, b"a", "", "/", "a", "a/", "/a", "a//b", ".", "..", "a/./b", "a/../b", ".a",
                             "a.", "a.b", "a\n", "a/b\n", "a" * 128, "a" * 129, "/".join(["a"] * 16),
                             "/".join(["a"] * 17), "/".join(["a" * 31] * 16) + "b", "/".join(["a" * 128] * 4),
                             "/".join(["a" * 127] * 5), "/".join(["a" * 127] * 4) + "/b"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    samples += ["/".join("a" * rng.randint(0, 130) for _ in range(rng.randint(1, 18))) for _ in range(2000)]
    for sample in samples:
        assert is_valid_resource(sample) == _resource_by_segments(sample), sample
