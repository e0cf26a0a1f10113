"""broker.strict_json: the one parser every reader of outside JSON uses."""

from __future__ import annotations

import base64

import pytest

from broker.strict_json import StrictJSONError, b64url_decode_canonical, loads_strict


@pytest.mark.parametrize(
    ("data", "reason", "name"),
    [
        (b'{"a":1,"a":2}', "duplicate", "a"),
        (b'{"x":{"k":1,"k":1}}', "duplicate", "k"),
        (b'{"n":NaN}', "constant", "NaN"),
        (b'[Infinity]', "constant", "Infinity"),
        (b'[-Infinity]', "constant", "-Infinity"),
        (b"\xff\xfe{}", "not_utf8", None),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep", None),
        (b"{'single': 1}", "invalid", None),
        (b"", "invalid", None),
        (b'{"a":1} trailing', "invalid", None),
    ],
)
def test_refusals_say_why(data: bytes, reason: str, name: str | None) -> None:
    with pytest.raises(StrictJSONError) as caught:
        loads_strict(data)
    assert caught.value.reason == reason
    assert caught.value.name == name


def test_accepts_i_json_text_and_bytes() -> None:
    assert loads_strict('{"a":[1,2.5,"é",true,null]}') == {"a": [1, 2.5, "é", True, None]}
    assert loads_strict(b'{"a":{"a":1}}') == {"a": {"a": 1}}  # the same name at two levels is fine


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        ("", b""),
        ("AQ", b"\x01"),
        ("_-8", b"\xff\xef"),
        ("AQ==", None),  # padding is not allowed
        ("A", None),  # impossible length
        ("AR", None),  # non-zero trailing bits: not the canonical encoding of b"\x01"
        ("A+/B", None),  # standard, not URL-safe, alphabet
        ("a b", None),
    ],
)
def test_b64url_is_canonical_or_refused(segment: str, expected: bytes | None) -> None:
    assert b64url_decode_canonical(segment) == expected
    if expected is not None:
        assert base64.urlsafe_b64encode(expected).rstrip(b"=").decode() == segment


def _b64url_reference(segment: str) -> bytes | None:
    """Decode and re-encode: canonical iff the round trip gives the segment back."""
    if len(segment) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except ValueError:
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == segment else None


def test_b64url_matches_decode_and_reencode_on_random_segments() -> None:
    import random

    rng = random.Random(4648)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    hostile = alphabet + "+/= \n\t.!%\x00é\udcff\u0100"
    for _ in range(50_000):
        pool = alphabet if rng.random() < 0.7 else hostile
        segment = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 12)))
        assert b64url_decode_canonical(segment) == _b64url_reference(segment), repr(segment)
    for size in range(40):
        data = rng.randbytes(size)
        segment = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        assert b64url_decode_canonical(segment) == data


def test_bom_and_surrogates_still_refused() -> None:
    with pytest.raises(StrictJSONError) as bom:
        loads_strict("\ufeff{}")
    assert bom.value.reason == "invalid"
    for text in ('{"a":"\\udfff"}', '["\\uD800x"]', '{"\\ud83d":1}', "[\"\ud800\"]"):
        with pytest.raises(StrictJSONError) as caught:
            loads_strict(text)
        assert caught.value.reason == "surrogate"
    assert loads_strict('["\\ud83d\\ude00", "\\u00e9"]') == ["\U0001f600", "é"]
