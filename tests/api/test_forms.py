"""broker.api.forms.parse_form reads and refuses exactly what urllib.parse.parse_qsl does (strict parsing,
blank values kept, at most MAX_FIELDS fields, UTF-8 after percent-decoding, no repeated parameter)."""

from __future__ import annotations

import random
from urllib.parse import parse_qsl, urlencode

import pytest

from broker.api.forms import MAX_FIELDS, parse_form
from broker.errors import BrokerError

FORM = "application/x-www-form-urlencoded"


def reference(body: bytes) -> dict[str, str] | str:
    """The parameters as parse_qsl reads them, or the description parse_form must refuse them with."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "request body is not UTF-8"
    if not text:
        return "request body is empty"
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS,
                          errors="strict")
    except UnicodeDecodeError:
        return "a form parameter is not UTF-8 after percent-decoding"
    except ValueError:
        return "request body is not a valid form encoding"
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            return f"parameter {name[:40]!r} is repeated"
        form[name] = value
    return form


def outcome(body: bytes) -> dict[str, str] | str:
    try:
        return parse_form(FORM, body)
    except BrokerError as exc:
        assert exc.code == "invalid_request"
        return exc.description


CASES = [
    b"a=1",
    b"a=",
    b"=",
    b"=x",
    b"a",
    b"a=1&",
    b"&a=1",
    b"a=1&&b=2",
    b"a=1=2",
    b"a+b=c+d",
    b"a%2Bb=c%2bd",
    b"a=%",
    b"a=%4",
    b"a=%zz",
    b"a=%%41",
    b"a=%41%",
    b"a=100%25",
    b"a=%C3%A9",
    b"a=%c3%a9",
    b"a=%C3",
    b"a=%C3x%A9",
    b"a=%ff%fe",
    b"a=%00",
    b"a=%ED%A0%80",  # an encoded surrogate is not UTF-8
    b"a=\xc3\xa9",
    b"a=\xc3\xa9%C3%A9",
    b"a=%C3\xc3\xa9",
    b"a=\xc3\xa9%A9",
    b"\xe2\x82\xac=%E2%82%AC",
    b"%61=1&a=2",
    b"a=1&b=2&a=3&a=4",
    b"a=1&a=2&c",
    b"a=%ff&a=1",
    b"a=1&a=2&b=%ff",
    b"a=\\%41",  # backslashes are plain characters, whatever follows them
    b"a=%5C%41",
    b"a=%\\",
    b"a=\\x41%41",
    b"a=\\N{HYPHEN}%41",
    b"a=\\u0041%41\\",
    b"grant_type=%00",
    b"grant_type=\xff",
    b"&".join(b"f%d=1" % i for i in range(MAX_FIELDS)),
    b"&".join(b"f%d=1" % i for i in range(MAX_FIELDS + 1)),
    b"&" * MAX_FIELDS,
    b"",
    urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
               "authorization_details": '[{"type":"intent","action":"orders.read","context":{"c":"é €"}}]'}).encode(),
]


@pytest.mark.parametrize("body", CASES)
def test_table_matches_parse_qsl(body: bytes) -> None:
    assert outcome(body) == reference(body)


def test_random_bodies_match_parse_qsl() -> None:
    rng = random.Random(20261203)
    pieces = ["a", "b", "Z", "=", "&", "+", "%", "%2", "%41", "%4a", "%4A", "%e9", "%C3", "%A9", "%E2%82%AC", "%zz",
              "%%", "\\", "\\x", "\\u00", "\\N{",
              "é", "€", "\U0001f600", " ", "%2B", "%26", "%3D", "%00", "%7f", "%80", "%ff", "0", "9"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 14)))
        body = text.encode("utf-8")
        if rng.random() < 0.05:
            body += bytes([rng.randrange(0x80, 0x100)])
        assert outcome(body) == reference(body), body


def test_other_media_types_are_refused() -> None:
    with pytest.raises(BrokerError) as caught:
        parse_form("application/json", b"a=1")
    assert caught.value.status == 415
    assert parse_form("Application/X-WWW-Form-Urlencoded; charset=utf-8", b"a=1") == {"a": "1"}
