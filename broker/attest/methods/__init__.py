"""Attestation methods: one module per way a workload proves its identity, behind one small registry.

A method module defines an :class:`AttestationMethod` and registers it with :func:`register`; the
attestor (:mod:`broker.attest.verifier`) and the registry of workloads (``attestation = [...]`` in
``workloads.toml``) know methods only through :data:`REGISTRY`. Adding a method touches its own
module and the import list below, nothing else.

Two shapes of method fit:

- **token methods** (``kubernetes``, ``spiffe-jwt``, ``oidc``, ``dev``): the evidence is a JWT from
  a configured issuer whose ``kind`` names the method. The attestor runs the shared JWT checks
  (:mod:`broker.attest.jwt_checks`: issuer allow-list, key, signature, audience, time, single use) and
  hands the verified claims to the method, which decides what SPIFFE ID they prove.
- **request methods** (an X.509-SVID from mutual TLS or a trusted proxy's XFCC header; a WIMSE
  workload identity token with its proof bound to the HTTP request): the evidence is taken from the
  request itself (:class:`~broker.attest.evidence.Evidence` carries the peer certificate chain, the
  forwarding address, the method, URL and headers). Such a method is selected by
  :attr:`AttestationMethod.evidence_types` (the ``subject_token_type``/``actor_token_type`` URN it
  answers, or the transport) and verifies the whole evidence itself.

Every method's :meth:`~AttestationMethod.verify` is ``async`` and returns a
:class:`~broker.models.WorkloadIdentity` or raises :class:`~broker.errors.AttestationError`.
"""

from __future__ import annotations

from broker.attest.methods.base import (
    REGISTRY,
    AttestationMethod,
    MethodRegistry,
    VerifiedJwt,
    register,
)

# The built-in methods register themselves on import.
from broker.attest.methods import dev, kubernetes, oidc, spiffe_jwt  # noqa: F401  isort: skip

__all__ = ["REGISTRY", "AttestationMethod", "MethodRegistry", "VerifiedJwt", "register"]
