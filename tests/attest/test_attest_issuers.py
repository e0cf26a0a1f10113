"""IssuerConfig: what the broker's settings accept, and what they refuse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.attest.issuers import DEFAULT_ALGORITHMS, IssuerConfig

BASE: dict[str, Any] = {
    "issuer": "https://spire.example.org",
    "kind": "spiffe-jwt",
    "audience": "https://broker.example",
    "jwks_url": "https://spire.example.org/keys",
    "trust_domain": "example.org",
}


def cfg(**over: Any) -> IssuerConfig:
    data = {**BASE, **over}
    return IssuerConfig(**{k: v for k, v in data.items() if v is not _DROP})


_DROP = object()


def test_defaults() -> None:
    c = cfg()
    assert c.algorithms == DEFAULT_ALGORITHMS == ("ES256", "RS256", "EdDSA", "PS256")
    assert (c.max_lifetime, c.require_jti, c.leeway) == (3600, True, 30)
    assert (c.jwks_refresh_min_interval, c.jwks_cache_ttl) == (30.0, 300.0)


def test_frozen() -> None:
    c = cfg()
    with pytest.raises(ValidationError):
        c.audience = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "over",
    [
        {"jwks_url": "http://127.0.0.1:8080/jwks"},
        {"jwks_url": "http://localhost/jwks"},
        {"jwks_url": "http://[::1]:9000/jwks"},
        {"jwks_url": _DROP, "jwks_file": "/etc/nhi/jwks.json"},
        {"algorithms": ["ES384", "EdDSA"]},
        {"kind": "kubernetes"},
        {"kind": "oidc", "trust_domain": None, "spiffe_id_template": "spiffe://people.example/{sub}"},
        {
            "kind": "oidc",
            "trust_domain": "people.example",
            "spiffe_id_template": "spiffe://people.example/{sub}",
        },
        {"kind": "dev", "jwks_url": _DROP, "trust_domain": None},
        {"max_lifetime": 600, "leeway": 0, "require_jti": False},
    ],
)
def test_accepted(over: dict[str, Any]) -> None:
    c = cfg(**over)
    assert isinstance(c.jwks_file, Path | None)


REFUSED = [
    ("alg-none", {"algorithms": ["none"]}, "'none' is never allowed"),
    ("alg-None", {"algorithms": ["ES256", "None"]}, "'none' is never allowed"),
    ("alg-hs256", {"algorithms": ["HS256"]}, "symmetric algorithm HS256"),
    ("alg-unknown", {"algorithms": ["ES256K"]}, "not supported"),
    ("alg-empty", {"algorithms": []}, "must not be empty"),
    ("alg-duplicate", {"algorithms": ["ES256", "ES256"]}, "duplicates"),
    ("jwks-both", {"jwks_file": "/x.json"}, "exactly one"),
    ("jwks-neither", {"jwks_url": _DROP}, "needs jwks_file or jwks_url"),
    ("jwks-http-remote", {"jwks_url": "http://spire.example.org/keys"}, "must use https"),
    ("jwks-ftp", {"jwks_url": "ftp://spire.example.org/keys"}, "must use https"),
    ("jwks-userinfo", {"jwks_url": "https://u:p@spire.example.org/keys"}, "userinfo"),
    ("jwks-fragment", {"jwks_url": "https://spire.example.org/keys#x"}, "fragment"),
    ("jwks-no-host", {"jwks_url": "https:///keys"}, "no host"),
    ("jwks-loopback-lookalike", {"jwks_url": "http://127.0.0.1.evil.example/keys"}, "must use https"),
    ("jwks-newline", {"jwks_url": "https://spire.example.org/keys\n"}, "control characters"),
    ("k8s-no-trust-domain", {"kind": "kubernetes", "trust_domain": None}, "needs trust_domain"),
    ("svid-no-trust-domain", {"trust_domain": None}, "needs trust_domain"),
    ("bad-trust-domain", {"trust_domain": "Example.org"}, "trust domain characters"),
    ("oidc-no-template", {"kind": "oidc"}, "needs spiffe_id_template"),
    (
        "oidc-bad-template",
        {"kind": "oidc", "spiffe_id_template": "spiffe://x/{email}"},
        "placeholders must be",
    ),
    (
        "oidc-template-other-td",
        {"kind": "oidc", "spiffe_id_template": "spiffe://other.org/{sub}"},
        "differs from trust_domain",
    ),
    ("template-not-oidc", {"spiffe_id_template": "spiffe://example.org/{sub}"}, "only for oidc"),
    ("kind-unknown", {"kind": "saml"}, "kind"),
    ("issuer-empty", {"issuer": ""}, "issuer"),
    ("issuer-newline", {"issuer": "https://spire.example.org\n"}, "control characters"),
    ("audience-space", {"audience": "a b"}, "control characters"),
    ("lifetime-zero", {"max_lifetime": 0}, "max_lifetime"),
    ("lifetime-day-plus", {"max_lifetime": 86401}, "max_lifetime"),
    ("leeway-negative", {"leeway": -1}, "leeway"),
    ("refresh-over-ttl", {"jwks_refresh_min_interval": 600, "jwks_cache_ttl": 300}, "must not exceed"),
    ("refresh-zero", {"jwks_refresh_min_interval": 0}, "jwks_refresh_min_interval"),
    ("extra-field", {"verify_signature": False}, "verify_signature"),
]


@pytest.mark.parametrize(("over", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(over: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        cfg(**over)
    assert says in str(caught.value)
