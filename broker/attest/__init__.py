"""attest stage: prove a workload identity from a subject token (RFC 8693 ``subject_token``).

Entry point: :class:`Attestor` (``verify(subject_token, subject_token_type) -> WorkloadIdentity``),
configured with one :class:`IssuerConfig` per trusted issuer. Key material comes from
:class:`JwksSource`; :class:`DevIssuer` is the trial-only local issuer. SPIFFE IDs are parsed by
:func:`parse_spiffe_id`.

    subject_token -> size/shape -> unverified peek (issuer, kid, alg allow-list)
                  -> JwksSource key -> pyjwt signature+iss+aud -> types/time/lifetime
                  -> the issuer kind's method (methods/: kubernetes, spiffe-jwt, oidc, dev) maps
                     the claims to a SPIFFE ID -> jti single use -> WorkloadIdentity

Each attestation method is one module under :mod:`broker.attest.methods`, registered in its small
registry; request-bound methods (an X.509-SVID over mTLS or XFCC, a WIMSE token with its proof) are
selected by evidence type and verify an :class:`~broker.attest.evidence.Evidence` themselves.
End-user tokens of delegated exchanges are verified by :mod:`broker.attest.users`.
"""

from broker.attest.dev import DEV_ISSUER, DevIssuer
from broker.attest.issuers import ALLOWED_ALGORITHMS, DEFAULT_ALGORITHMS, IssuerConfig, IssuerKind
from broker.attest.jwks import JwksSource, VerificationKey, jwk_thumbprint
from broker.attest.spiffe import SpiffeId, parse_spiffe_id
from broker.attest.template import SpiffeIdTemplate, TemplateError
from broker.attest.verifier import JTI_NAMESPACE, SUBJECT_TOKEN_TYPES, Attestor

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "DEV_ISSUER",
    "JTI_NAMESPACE",
    "SUBJECT_TOKEN_TYPES",
    "Attestor",
    "DevIssuer",
    "IssuerConfig",
    "IssuerKind",
    "JwksSource",
    "SpiffeId",
    "SpiffeIdTemplate",
    "TemplateError",
    "VerificationKey",
    "jwk_thumbprint",
    "parse_spiffe_id",
]
