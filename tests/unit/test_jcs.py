"""The fast RFC 8785 path must produce the reference encoder's bytes, or defer to it."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
import rfc8785

from broker.jcs import CanonicalizationError, canonical_json

# Characters where encoders tend to disagree: controls, escapes, DEL, the Latin-1 and BMP edges,
# line separators, a private-use character above the surrogates, and astral-plane characters.
TRICKY = [
    "\x00", "\x01", "\x07", "\b", "\t", "\n", "\x0b", "\f", "\r", "\x1f", " ", '"', "\\", "/", "\x7f",
    "\x80", "\xe9", "\u2028", "\u2029", "\ud7ff", "\ue000", "\uffef", "\uffff", "\U0001f600", "\U00010000",
    "a", "Z", "0", "€",
]


def random_string(rng: random.Random) -> str:
    return "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 6)))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.45:
        return rng.choice([
            lambda: random_string(rng),
            lambda: rng.randint(-(2**53) - 2, 2**53 + 2),
            lambda: rng.randint(-1000, 1000),
            lambda: rng.choice([True, False, None]),
            lambda: rng.choice([0.0, -0.0, 1.0, 0.5, 1e21, 1e-7, 123456789.125, 5e-324, 2.0**60]),
        ])()
    if roll < 0.75:
        return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def reference(value: Any) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except CanonicalizationError as exc:
        return type(exc)


def fast(value: Any) -> bytes | type[Exception]:
    try:
        return canonical_json(value)
    except CanonicalizationError as exc:
        return type(exc)


@pytest.mark.parametrize("seed", range(20))
def test_random_values_match_the_reference_encoder(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        value = {random_string(rng): random_value(rng) for _ in range(rng.randint(0, 6))}
        assert fast(value) == reference(value), value


def random_float(rng: random.Random) -> float:
    return rng.choice([
        lambda: rng.uniform(-1e6, 1e6),
        lambda: round(rng.uniform(-1000, 1000), rng.randint(0, 4)),
        lambda: rng.uniform(-1, 1) * 10.0 ** rng.randint(-30, 30),
        lambda: struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0],  # any double, NaN included
        lambda: float(rng.randint(-(2**60), 2**60)),
    ])()


@pytest.mark.parametrize("seed", range(5))
def test_random_floats_match_the_reference_encoder(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(4000):
        value = {"f": random_float(rng), "g": [random_float(rng), "x"]}
        assert fast(value) == reference(value), value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"amount": 20.5, "p": [0.001, -3.25, 123456789.125, 0.1, 1e-4, 1.5e15]},
         b'{"amount":20.5,"p":[0.001,-3.25,123456789.125,0.1,0.0001,1500000000000000]}'),
        ({"f": 20.0, "g": 5e-324, "h": -0.0, "i": 1e16, "j": 1.7976931348623157e308},
         b'{"f":20,"g":5e-324,"h":0,"i":10000000000000000,"j":1.7976931348623157e+308}'),
        # RFC 8785 §3.2.3: keys sort by UTF-16 code units, so U+1F600 (D83D DE00) sorts before U+E000.
        ({"\ue000": 1, "\U0001f600": 2}, '{"\U0001f600":2,"\ue000":1}'.encode()),
        ({"b": [], "a": {}, "c": ""}, b'{"a":{},"b":[],"c":""}'),
        ({"s": "\u2028\x7f\x1f\n"}, b'{"s":"\xe2\x80\xa8\x7f\\u001f\\n"}'),
        ({"n": 2**53 - 1, "m": -(2**53 - 1)}, b'{"m":-9007199254740991,"n":9007199254740991}'),
        # Numbers take the ECMAScript form (RFC 8785 §3.2.2.3), not Python's repr.
        ({"f": 1.0, "g": 1e21, "h": 1e-7}, b'{"f":1,"g":1e+21,"h":1e-7}'),
        ({"t": (1, 2)}, b'{"t":[1,2]}'),
    ],
)
def test_known_encodings(value: Any, expected: bytes) -> None:
    assert canonical_json(value) == expected == rfc8785.dumps(value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"big": 2**53}, rfc8785.IntegerDomainError),
        ({"nan": float("nan")}, rfc8785.FloatDomainError),
        ({"lone": "\ud800"}, CanonicalizationError),
        ({"\udfff": 1}, CanonicalizationError),
        ({1: "key"}, CanonicalizationError),
        ({"bytes": b"x"}, CanonicalizationError),
    ],
)
def test_what_json_cannot_carry_is_refused(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_json(value)


# RFC 8785 §3.2.4 (sample canonicalisation): the input, and without its numbers (which takes the fast path).
RFC8785_INPUT = {
    "numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001],
    "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
    "literals": [None, True, False],
}
RFC8785_OUTPUT = (
    '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
    '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
).encode()


def test_rfc8785_sample() -> None:
    assert canonical_json(RFC8785_INPUT) == RFC8785_OUTPUT
    without_numbers = {k: v for k, v in RFC8785_INPUT.items() if k != "numbers"}
    expected = RFC8785_OUTPUT.replace(b'"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],', b"")
    assert canonical_json(without_numbers) == expected == rfc8785.dumps(without_numbers)


@pytest.mark.parametrize(
    "value",
    [
        {"\U0001f600": {"\ue000": 1, "a": "\U0001f600"}},  # an astral key below the top level
        {"a": ["\U0001f600", {"\U0001f600": 1, "\ufb33": 2}]},  # ... inside an array
        {"a": "\U0001f600", "\ufb33": "x", "\u20ac": "y"},  # astral in a value only: same bytes either way
    ],
)
def test_astral_characters_in_values_and_nested_keys(value: Any) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)
