"""``kubernetes``: a projected service-account token of a Kubernetes API server.

The SPIFFE ID is ``spiffe://<trust_domain>/ns/<namespace>/sa/<name>`` (the SPIFFE convention SPIRE's
k8s attestor uses), from the ``kubernetes.io`` claim, which must agree with ``sub``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from broker.attest.methods.base import TokenMethod, VerifiedJwt, register
from broker.attest.spiffe import SpiffeId
from broker.errors import AttestationError

__all__ = ["KubernetesMethod"]

# Kubernetes names: a namespace is an RFC 1123 label, a service account an RFC 1123 subdomain.
_K8S_LABEL_RE = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_K8S_SUBDOMAIN_RE = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
)
_K8S_UID_RE = re.compile(r"[A-Za-z0-9-]{1,128}")


class KubernetesMethod(TokenMethod):
    """Pods with a projected service-account token (audience = the broker)."""

    name = "kubernetes"

    def spiffe_id(self, token: VerifiedJwt) -> SpiffeId:
        trust_domain = token.config.trust_domain
        if trust_domain is None:  # IssuerConfig requires it for this kind
            raise AttestationError("the kubernetes issuer has no trust_domain")
        return _kubernetes_spiffe_id(token.claims, token.subject, trust_domain)


def _kubernetes_spiffe_id(claims: Mapping[str, Any], sub: str, trust_domain: str) -> SpiffeId:
    """``spiffe://<td>/ns/<namespace>/sa/<name>`` from a projected service account token."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        raise AttestationError("claim 'kubernetes.io' is missing or not an object")
    namespace = k8s.get("namespace")
    account = k8s.get("serviceaccount")
    if not isinstance(account, dict):
        raise AttestationError("claim 'kubernetes.io.serviceaccount' is missing or not an object")
    name = account.get("name")
    uid = account.get("uid")
    if not isinstance(namespace, str) or _K8S_LABEL_RE.fullmatch(namespace) is None:
        raise AttestationError("claim 'kubernetes.io.namespace' is not a valid namespace")
    if not isinstance(name, str) or _K8S_SUBDOMAIN_RE.fullmatch(name) is None:
        raise AttestationError("claim 'kubernetes.io.serviceaccount.name' is not a valid name")
    if not isinstance(uid, str) or _K8S_UID_RE.fullmatch(uid) is None:
        raise AttestationError("claim 'kubernetes.io.serviceaccount.uid' is missing or invalid")
    # The API server writes both; a token where they disagree was not made by it.
    if sub != f"system:serviceaccount:{namespace}:{name}":
        raise AttestationError("claim 'kubernetes.io' does not match sub")
    return SpiffeId(trust_domain, f"/ns/{namespace}/sa/{name}")


register(KubernetesMethod())
