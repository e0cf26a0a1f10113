"""The attestation-method registry: one module per method, selected by issuer kind (token methods)
or by evidence type (request methods such as an X.509-SVID or a WIMSE proof)."""

from __future__ import annotations

import asyncio

import pytest

from broker.attest.evidence import Evidence
from broker.attest.methods import REGISTRY, MethodRegistry, VerifiedJwt
from broker.attest.methods.base import TokenMethod
from broker.errors import AttestationError, ConfigError
from broker.models import WorkloadIdentity
from broker.policy import ATTESTATION_METHODS


def test_every_builtin_method_is_registered_and_listable_in_the_registry() -> None:
    assert {"kubernetes", "spiffe-jwt", "oidc", "dev"} <= REGISTRY.names
    assert ATTESTATION_METHODS == REGISTRY.names  # workloads.toml accepts exactly the registered methods
    for name in ("kubernetes", "spiffe-jwt", "oidc", "dev"):
        assert REGISTRY.get(name).name == name


class _RequestMethod:
    """A request method as an X.509-SVID or WIMSE module would be: it verifies the evidence itself."""

    name = "test-proof"
    evidence_types = frozenset({"urn:example:proof"})

    async def verify(self, evidence: Evidence, token: VerifiedJwt | None = None) -> WorkloadIdentity:
        if evidence.headers.get("proof") != "ok":
            raise AttestationError("proof does not match the request")
        return WorkloadIdentity(spiffe_id="spiffe://example.org/w", issuer="test", method=self.name,
                                subject="w", evidence_digest="sha256:" + "0" * 64, expires_at=0)


def test_a_request_method_is_one_registration() -> None:
    registry = MethodRegistry()
    method = registry.register(_RequestMethod())
    assert registry.for_evidence_type("urn:example:proof") is method
    assert registry.for_evidence_type("urn:ietf:params:oauth:token-type:jwt") is None
    good = Evidence(token="secret-token-value", token_type="urn:example:proof", headers={"proof": "ok"})
    assert asyncio.run(method.verify(good)).method == "test-proof"
    with pytest.raises(AttestationError, match="does not match"):
        asyncio.run(method.verify(Evidence(token="t", token_type="urn:example:proof", headers={"proof": "no"})))
    assert "secret-token-value" not in repr(good)  # evidence never shows its token


def test_names_and_evidence_types_are_registered_once() -> None:
    registry = MethodRegistry()
    registry.register(_RequestMethod())
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register(_RequestMethod())

    class Other(_RequestMethod):
        name = "other"

    with pytest.raises(ConfigError, match="claimed by two"):
        registry.register(Other())
    with pytest.raises(AttestationError, match="not available"):
        registry.get("nope")


def test_a_token_method_needs_a_verified_token() -> None:
    method = REGISTRY.get("spiffe-jwt")
    assert isinstance(method, TokenMethod)
    with pytest.raises(AttestationError, match="not a token of a spiffe-jwt issuer"):
        asyncio.run(method.verify(Evidence(token="x", token_type="urn:ietf:params:oauth:token-type:jwt")))
