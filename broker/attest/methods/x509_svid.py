"""``x509-svid``: a workload's X.509-SVID, over mutual TLS (RFC 8705 §2) or forwarded by a trusted proxy.

The token request says which evidence it presents (docs/attestation.md): ``subject_token_type`` (or
``actor_token_type``) is :data:`X509_SVID_TOKEN_TYPE` and ``subject_token`` is the SPIFFE ID the
workload claims; the certificate itself comes from the transport, never from the form:

- **mutual TLS** terminated by the broker (:mod:`broker.tls`): the peer's certificate chain, leaf
  first, from the ASGI TLS extension;
- **a trusted proxy** (Envoy and others): the ``x-forwarded-client-cert`` header
  (:mod:`broker.attest.xfcc`), read only when the connecting address is in ``trusted_proxies``. The
  header from any other address is refused, unread: anyone can write it.

The chain is verified against the trust domain's bundle (:mod:`broker.attest.x509_svid`: one URI SAN,
leaf not a CA, key usage, path validation at the broker's time) and the claimed SPIFFE ID must be the
certificate's. The identity carries the RFC 8705 §3.1 thumbprint, so the task token is
certificate-bound (``cnf.x5t#S256``). Bundles are reloaded by :meth:`X509SvidMethod.refresh`, which
reads files: the app calls it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.attest.evidence import Evidence
from broker.attest.methods.base import VerifiedJwt, register
from broker.attest.spiffe import validate_trust_domain
from broker.attest.x509_bundles import X509Bundles
from broker.attest.x509_svid import MAX_CHAIN_LENGTH, verify_x509_svid
from broker.attest.xfcc import forwarded_certificate_chain
from broker.clock import Clock
from broker.errors import AttestationError, ConfigError, InvalidRequest
from broker.models import WorkloadIdentity

__all__ = ["X509_SVID_TOKEN_TYPE", "XFCC_HEADER", "X509Settings", "X509SvidMethod"]

#: The ``subject_token_type``/``actor_token_type`` of certificate evidence (a broker URN: no IETF
#: token type names an X.509 certificate presented in the TLS layer).
X509_SVID_TOKEN_TYPE = "urn:nhi-broker:token-type:x509-svid"
XFCC_HEADER = "x-forwarded-client-cert"

log = logging.getLogger("nhi_broker.attest")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class X509Settings(BaseModel):
    """``[x509]``: trust bundles per trust domain and the proxies allowed to forward certificates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundles: dict[str, Path] = Field(
        description="Trust domain -> PEM file of its X.509 bundle (root certificates); reloaded when it changes."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) whose x-forwarded-client-cert header is read; none by default.",
    )
    refresh_interval: float = Field(
        10.0, ge=1.0, le=3600.0, description="Seconds between checks of the bundle files for changes."
    )

    @field_validator("bundles")
    @classmethod
    def _bundles(cls, value: dict[str, Path]) -> dict[str, Path]:
        if not value:
            raise ValueError("x509.bundles needs at least one trust domain")
        for trust_domain in value:
            validate_trust_domain(trust_domain)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=True)  # ValueError names the bad entry
        return value

    def proxy_networks(self) -> tuple[Network, ...]:
        """``trusted_proxies`` parsed."""
        return tuple(ipaddress.ip_network(item, strict=True) for item in self.trusted_proxies)


class X509SvidMethod:
    """X.509-SVIDs of configured trust domains (see the module docstring).

    The instance in the registry has no bundles and refuses every request ("not configured"); the
    runtime builds a configured one with :meth:`configured`.
    """

    name = "x509-svid"
    evidence_types = frozenset({X509_SVID_TOKEN_TYPE})

    def __init__(
        self, bundles: X509Bundles | None = None, trusted_proxies: Sequence[Network] = (), clock: Clock | None = None
    ) -> None:
        self._bundles = bundles
        self._proxies = tuple(trusted_proxies)
        self._clock = clock

    @classmethod
    def configured(cls, settings: X509Settings, clock: Clock) -> X509SvidMethod:
        """A method over ``settings``' bundles (read now: call at start-up, before the event loop serves)."""
        try:
            bundles = X509Bundles(settings.bundles)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return cls(bundles, settings.proxy_networks(), clock)

    @property
    def bundles(self) -> X509Bundles | None:
        """The trust bundles in use (``None`` when not configured)."""
        return self._bundles

    def refresh(self) -> list[str]:
        """Reload changed bundle files (reads files: call from a worker thread); the changed trust domains."""
        return self._bundles.refresh() if self._bundles is not None else []

    async def run_refresher(
        self, interval: float, on_change: Callable[[Mapping[str, Sequence[x509.Certificate]]], object] | None = None
    ) -> None:
        """Every ``interval`` seconds, reload changed bundle files in a worker thread (never on the loop);
        ``on_change`` gets the new roots (the TLS layer adds them). Runs until cancelled."""
        limiter = anyio.CapacityLimiter(1)  # its own thread: a slow disk delays no other backend
        while True:
            await anyio.sleep(interval)
            try:
                changed = await anyio.to_thread.run_sync(self.refresh, limiter=limiter)
            except Exception:  # a refresh that fails keeps the bundles in force; try again next time
                log.exception("X.509 bundle refresh failed")
                continue
            if changed and on_change is not None and self._bundles is not None:
                on_change(self._bundles.roots)

    def _trusted_proxy(self, address: str | None) -> bool:
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)

    def _chain(self, evidence: Evidence) -> list[x509.Certificate]:
        """The presented chain: a trusted proxy's XFCC header, else the mutual-TLS peer's."""
        forwarded = evidence.headers.get(XFCC_HEADER)
        if forwarded is not None:
            # (a) Only a configured proxy may speak for a client; the header is not even parsed otherwise.
            if not self._trusted_proxy(evidence.peer_address):
                raise AttestationError(
                    f"{XFCC_HEADER} is accepted only from a trusted proxy; {evidence.peer_address} is not one"
                )
            return forwarded_certificate_chain(forwarded)
        if evidence.peer_chain:
            if len(evidence.peer_chain) > MAX_CHAIN_LENGTH:
                raise AttestationError(f"the certificate chain is longer than {MAX_CHAIN_LENGTH}")
            try:
                return [x509.load_der_x509_certificate(der) for der in evidence.peer_chain]
            except ValueError:
                raise AttestationError("the TLS peer certificate is not valid DER") from None
        raise AttestationError(
            f"{evidence.label}_type {X509_SVID_TOKEN_TYPE} needs a client certificate: mutual TLS to the broker,"
            f" or {XFCC_HEADER} from a trusted proxy"
        )

    async def verify(self, evidence: Evidence, token: VerifiedJwt | None = None) -> WorkloadIdentity:
        """The identity the presented X.509-SVID proves (see the module docstring)."""
        if self._bundles is None or self._clock is None:
            raise AttestationError("X.509-SVID attestation is not configured on this broker ([x509] bundles)")
        # (1) The claimed identity: the form's token names the SPIFFE ID, the certificate proves it.
        claimed = evidence.token
        if not claimed:
            raise InvalidRequest(f"{evidence.label} must name the SPIFFE ID of the client certificate")
        # (2) The chain, from the transport or a trusted proxy; (3) verified to its trust domain's bundle.
        roots: Mapping[str, Sequence[x509.Certificate]] = self._bundles.roots
        svid = verify_x509_svid(self._chain(evidence), roots, self._clock.now())
        # (4) The certificate must be the one the request says it is.
        if svid.spiffe_id != claimed:
            raise AttestationError(f"{evidence.label} does not match the client certificate's SPIFFE ID")
        return WorkloadIdentity(
            spiffe_id=svid.spiffe_id,
            issuer=f"spiffe://{svid.trust_domain}",
            method=self.name,
            subject=svid.spiffe_id,
            evidence_digest=svid.evidence_digest,
            expires_at=svid.not_after,
            cnf_x5t_s256=svid.x5t_s256,
        )


register(X509SvidMethod())
