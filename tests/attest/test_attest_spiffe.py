"""SPIFFE ID parsing (SPIFFE-ID.md §2) and SPIFFE ID templates."""

from __future__ import annotations

import pytest

from broker.attest.spiffe import SpiffeId, parse_spiffe_id, validate_path_segment, validate_trust_domain
from broker.attest.template import SpiffeIdTemplate, TemplateError

VALID = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/workload", "example.org", "/workload"),
    ("spiffe://example.org/ns/payments/sa/refund-bot", "example.org", "/ns/payments/sa/refund-bot"),
    ("spiffe://a_b-c.d0/A.b-C_9", "a_b-c.d0", "/A.b-C_9"),
    ("spiffe://1.2.3.4/x", "1.2.3.4", "/x"),
    ("spiffe://example.org/..a/.b/c..", "example.org", "/..a/.b/c.."),
    ("spiffe://td/" + "a" * (2048 - len("spiffe://td/")), "td", "/" + "a" * (2048 - len("spiffe://td/"))),
]


@pytest.mark.parametrize(("value", "td", "path"), VALID)
def test_valid_ids_round_trip(value: str, td: str, path: str) -> None:
    sid = parse_spiffe_id(value)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == value
    assert parse_spiffe_id(str(sid)) == sid


INVALID = [
    ("empty", "", "empty"),
    ("no-scheme", "example.org/workload", "scheme"),
    ("upper-case-scheme", "SPIFFE://example.org/workload", "scheme"),
    ("mixed-case-scheme", "Spiffe://example.org/workload", "scheme"),
    ("other-scheme", "https://example.org/workload", "scheme"),
    ("one-slash", "spiffe:/example.org/workload", "scheme"),
    ("missing-trust-domain", "spiffe:///workload", "trust domain is missing"),
    ("scheme-only", "spiffe://", "trust domain is missing"),
    ("upper-case-trust-domain", "spiffe://Example.org/workload", "trust domain characters"),
    ("port", "spiffe://example.org:8443/workload", "port"),
    ("userinfo", "spiffe://user@example.org/workload", "userinfo"),
    ("userinfo-password", "spiffe://user:pw@example.org/workload", "userinfo"),
    ("query", "spiffe://example.org/workload?x=1", "query"),
    ("query-in-trust-domain", "spiffe://example.org?x=1", "query"),
    ("fragment", "spiffe://example.org/workload#frag", "fragment"),
    ("percent-encoding-path", "spiffe://example.org/work%20load", "percent-encoding"),
    ("percent-encoding-td", "spiffe://exa%6dple.org/workload", "percent-encoding"),
    ("empty-segment", "spiffe://example.org//workload", "empty segments"),
    ("empty-middle-segment", "spiffe://example.org/a//b", "empty segments"),
    ("trailing-slash", "spiffe://example.org/workload/", "trailing slash"),
    ("root-slash", "spiffe://example.org/", "trailing slash"),
    ("dot-segment", "spiffe://example.org/./workload", "dot segments"),
    ("dot-dot-segment", "spiffe://example.org/a/../b", "dot segments"),
    ("final-dot-dot", "spiffe://example.org/a/..", "dot segments"),
    ("trailing-newline", "spiffe://example.org/workload\n", "characters are limited"),
    ("trailing-newline-td", "spiffe://example.org\n", "trust domain characters"),
    ("space", "spiffe://example.org/work load", "characters are limited"),
    ("unicode", "spiffe://example.org/wörk", "characters are limited"),
    ("unicode-td", "spiffe://exämple.org/w", "trust domain characters"),
    ("backslash", "spiffe://example.org/a\\b", "characters are limited"),
    ("nul", "spiffe://example.org/a\x00b", "characters are limited"),
    ("over-2048-bytes", "spiffe://td/" + "a" * (2049 - len("spiffe://td/")), "exceeds 2048 bytes"),
    ("over-2048-bytes-multibyte", "spiffe://td/" + "é" * 1100, "exceeds 2048 bytes"),
]


@pytest.mark.parametrize(("value", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_ids_name_the_reason(value: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_spiffe_id(value)
    assert reason in str(caught.value)


def test_non_string_refused() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_spiffe_id(b"spiffe://example.org/x")  # type: ignore[arg-type]


def test_dataclass_validates_on_construction() -> None:
    assert str(SpiffeId("example.org", "/a/b")) == "spiffe://example.org/a/b"
    assert SpiffeId("example.org", "/a/b").segments == ("a", "b")
    assert SpiffeId("example.org", "").segments == ()
    for td, path in [
        ("Example.org", "/a"),
        ("example.org", "a"),
        ("example.org", "/a/"),
        ("example.org", "/.."),
    ]:
        with pytest.raises(ValueError):
            SpiffeId(td, path)


def test_dataclass_is_frozen() -> None:
    sid = parse_spiffe_id("spiffe://example.org/a")
    with pytest.raises(AttributeError):
        sid.path = "/admin"  # type: ignore[misc]


def test_component_validators() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    assert validate_path_segment("a.b") == "a.b"
    for bad in ["", ".", "..", "a/b", "a\n", "%41"]:
        with pytest.raises(ValueError):
            validate_path_segment(bad)
    for bad in ["", "EXAMPLE", "a:1", "a@b", "a\n"]:
        with pytest.raises(ValueError):
            validate_trust_domain(bad)


# --- templates -------------------------------------------------------------------------------

BAD_TEMPLATES = [
    ("no-placeholder", "spiffe://example.org/oidc/alice", "no placeholder"),
    ("placeholder-in-trust-domain", "spiffe://{sub}.example.org/x", "only in the path"),
    ("placeholder-is-trust-domain", "spiffe://{sub}/x", "only in the path"),
    ("placeholder-ends-trust-domain", "spiffe://example.org{sub}/x", "only in the path"),
    ("no-path", "spiffe://example.org{sub}", "only in the path"),
    ("bad-scheme", "https://example.org/{sub}", "scheme"),
    ("unknown-placeholder", "spiffe://example.org/{email}", "placeholders must be"),
    ("expression", "spiffe://example.org/{claim:a.b}", "placeholders must be"),
    ("empty-claim-name", "spiffe://example.org/{claim:}", "placeholders must be"),
    ("unbalanced", "spiffe://example.org/{sub", "unbalanced"),
    ("nested", "spiffe://example.org/{{sub}}", "unbalanced"),
    ("trailing-slash", "spiffe://example.org/{sub}/", "trailing slash"),
    ("empty-segment", "spiffe://example.org//{sub}", "empty segments"),
    ("empty", "", "non-empty"),
]


@pytest.mark.parametrize(
    ("source", "reason"), [c[1:] for c in BAD_TEMPLATES], ids=[c[0] for c in BAD_TEMPLATES]
)
def test_bad_templates_refused(source: str, reason: str) -> None:
    with pytest.raises(TemplateError) as caught:
        SpiffeIdTemplate.compile(source)
    assert reason in str(caught.value)


def test_template_render() -> None:
    t = SpiffeIdTemplate.compile("spiffe://example.org/t/{claim:tid}/u-{sub}")
    assert t.trust_domain == "example.org"
    assert t.claims == ("tid", "sub")
    assert str(t.render({"sub": "17", "tid": "acme"})) == "spiffe://example.org/t/acme/u-17"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "a/b"}, "not usable"),
        ({"sub": ".."}, "dot segments"),
        ({"sub": "."}, "dot segments"),
        ({"sub": ""}, "not usable"),
        ({"sub": 17}, "not usable"),
        ({"sub": ["a"]}, "not usable"),
        ({"sub": "a\n"}, "not usable"),
        ({"sub": "x" * 256}, "not usable"),
        ({}, "missing"),
    ],
)
def test_template_refuses_unsafe_values(claims: dict[str, object], reason: str) -> None:
    t = SpiffeIdTemplate.compile("spiffe://example.org/oidc/{sub}")
    with pytest.raises(TemplateError) as caught:
        t.render(claims)
    assert reason in str(caught.value)


def test_template_partial_segment_dot_value_is_fine() -> None:
    # "u-." is an ordinary segment; only whole "." / ".." segments are dot segments.
    t = SpiffeIdTemplate.compile("spiffe://example.org/u-{sub}")
    assert str(t.render({"sub": "."})) == "spiffe://example.org/u-."


def test_memo_returns_the_same_parse_and_never_remembers_a_refusal() -> None:
    from broker.attest import spiffe

    value = "spiffe://memo.example/ns/a/sa/b"
    first = parse_spiffe_id(value)
    assert parse_spiffe_id(value) is first  # remembered
    for _ in range(2):  # a refused ID is refused again, with its reason
        with pytest.raises(ValueError, match="trailing slash"):
            parse_spiffe_id(value + "/")
    assert value + "/" not in spiffe._memo


def test_memo_is_bounded_and_ignores_str_subclasses() -> None:
    from broker.attest import spiffe

    for i in range(spiffe._MEMO_SIZE + 10):
        parse_spiffe_id(f"spiffe://bound.example/w{i}")
    assert len(spiffe._memo) <= spiffe._MEMO_SIZE

    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    with pytest.raises(ValueError, match="scheme"):
        parse_spiffe_id(Sneaky("https://bound.example/w1"))
    assert parse_spiffe_id(Sneaky("spiffe://bound.example/sneaky")) == SpiffeId("bound.example", "/sneaky")
    assert not any(type(key) is not str for key in spiffe._memo)
