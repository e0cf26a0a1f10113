"""What a token request presents as a workload's identity, before anything is verified.

An :class:`Evidence` is built by the HTTP layer from one request and handed to the attestor, which
selects an attestation method (:mod:`broker.attest.methods`) and lets it verify. It carries the
presented token (``subject_token`` or ``actor_token``) and what request-bound methods need besides:
the HTTP method, URL and headers (a WIMSE proof is bound to them) and the TLS peer's certificate
chain or the connecting address (an X.509-SVID over mutual TLS, or forwarded by a trusted proxy).
Nothing in it is trusted; it never reaches a log or the ledger (only a digest of it does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Evidence"]


@dataclass(frozen=True, slots=True)
class Evidence:
    """The unverified evidence of one request (see the module docstring).

    ``label`` names the token in error descriptions (``subject_token`` or ``actor_token``).
    ``headers`` are lower-cased names; ``peer_chain`` the DER certificates of a mutual-TLS peer, leaf
    first; ``peer_address`` the address the request came from (a forwarded certificate is accepted
    only from configured proxy addresses).
    """

    token: str | None
    token_type: str | None
    label: str = "subject_token"
    http_method: str | None = None
    http_url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    peer_chain: tuple[bytes, ...] = ()
    peer_address: str | None = None

    def __repr__(self) -> str:  # never show the token or certificates
        return f"Evidence(label={self.label!r}, token_type={self.token_type!r}, peer_chain={len(self.peer_chain)})"
