"""RFC 8785 leaves: exact bytes for known inputs, refusal of what JSON cannot carry exactly."""

from __future__ import annotations

import pytest

from broker.errors import VerificationError
from broker.ledger.canonical import decode_entry, encode_entry


@pytest.mark.parametrize(
    "entry,expected",
    [
        ({"b": 1, "a": [True, None, "x"]}, b'{"a":[true,null,"x"],"b":1}'),
        ({"nested": {"z": {}, "y": []}}, b'{"nested":{"y":[],"z":{}}}'),
        # RFC 8785 §3.2.2.3 / ECMAScript number serialisation.
        ({"n": 1e21}, b'{"n":1e+21}'),
        ({"n": 1e-7}, b'{"n":1e-7}'),
        ({"n": 333333333.33333329}, b'{"n":333333333.3333333}'),
        ({"n": -0.0}, b'{"n":0}'),
        ({"n": 1.0}, b'{"n":1}'),
        ({"n": 2**53 - 1}, b'{"n":9007199254740991}'),
        # RFC 8785 §3.2.2.2: only the mandatory escapes; everything else is raw UTF-8.
        ({"s": '\u20ac\n\u0001"\\/'}, b'{"s":"\xe2\x82\xac\\n\\u0001\\"\\\\/"}'),
    ],
)
def test_encode_known_outputs(entry, expected):
    assert encode_entry(entry) == expected
    assert decode_entry(expected) == entry


def test_keys_sort_by_utf16_code_units():
    # RFC 8785 §3.2.3's own example: U+1F600 (a surrogate pair, 0xD83D...) sorts before U+FB33,
    # although its code point is larger.
    entry = {k: i for i, k in enumerate(["\u20ac", "\r", "\ufb33", "1", "\U0001f600", "\u0080", "\u00f6"])}
    encoded = encode_entry(entry).decode("utf-8")
    expected = ["\\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    order = [encoded.index(f'"{k}"') for k in expected]
    assert order == sorted(order)


@pytest.mark.parametrize(
    "entry",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": float("-inf")},
        {1: "non-string key"},
        {"x": b"bytes"},
        {"x": {1, 2}},
        {"x": 2**53},
        {"x": -(2**53)},
        {"x": "\ud800"},  # lone surrogate: not UTF-8
        {"x": object()},
        ["not", "an", "object"],
        "string",
    ],
    ids=repr,
)
def test_encode_refuses(entry):
    with pytest.raises(ValueError):
        encode_entry(entry)


def test_encode_refuses_deep_nesting():
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError):
        encode_entry(deep)


@pytest.mark.parametrize(
    "data,reason",
    [
        (b'{"a":1,"a":2}', "duplicate"),
        (b'{"a":{"b":1,"b":1}}', "duplicate"),
        (b'{"b":1,"a":2}', "canonical"),
        (b'{ "a":1}', "canonical"),
        (b'{"a":1}\n', "canonical"),
        (b'{"a":1.0}', "canonical"),
        (b'{"a":1E3}', "canonical"),
        (b'{"a":"\\u0041"}', "canonical"),
        (b'{"a":NaN}', "non-JSON number"),
        (b'{"a":Infinity}', "non-JSON number"),
        (b'{"a":1e400}', "canonicalised"),
        (b'{"a":9007199254740993}', "canonicalised"),
        (b'{"a":"\\ud800"}', "canonicalised"),
        (b"[1,2]", "not a JSON object"),
        (b'"a"', "not a JSON object"),
        (b'{"a":', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a":"\xff"}', "UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),  # a BOM is not JSON text
    ],
)
def test_decode_refuses(data, reason):
    with pytest.raises(VerificationError, match=reason):
        decode_entry(data)


def test_decode_round_trip_of_a_realistic_entry():
    entry = {
        "v": 1,
        "kind": "issuance",
        "time": "2026-11-02T10:00:00Z",
        "workload": {"spiffe_id": "spiffe://example.org/bot", "owner": "alice@example.org"},
        "intent": {"type": "intent", "action": "refund", "resource": "order/42", "context": {"amount": 12.5}},
        "decision": {"effect": "allow", "rule": "r1", "policy_version": "sha256:" + "0" * 64},
        "credential": {"kind": "jwt", "jti": "abc", "sha256": "f" * 64},
    }
    leaf = encode_entry(entry)
    assert decode_entry(leaf) == entry
    assert encode_entry(decode_entry(leaf)) == leaf
