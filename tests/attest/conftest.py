"""Fixtures for attestation tests: per-test keys, a token builder, a fixed clock, a real SQLite store
and a real local HTTP server for JWKS documents (no mocks)."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from broker.attest.issuers import IssuerConfig
from broker.attest.jwks import JwksSource, jwk_thumbprint
from broker.attest.verifier import Attestor
from broker.clock import FixedClock
from broker.models import WorkloadIdentity
from broker.state.sqlite import SqliteStateStore
from tests.helpers import run

NOW = 1_800_000_000
AUDIENCE = "https://broker.example/v1/token"
SPIFFE_ISS = "https://spire.example.org"
K8S_ISS = "https://kubernetes.default.svc.cluster.local"
OIDC_ISS = "https://login.example.com"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def b64url(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Signer:
    """A private key with its public JWK; signs tokens the way an issuer would (or an attacker)."""

    alg: str
    private_key: Any
    kid: str | None
    public_jwk: dict[str, Any] = field(default_factory=dict)

    def sign(
        self, claims: dict[str, Any], headers: dict[str, Any] | None = None, alg: str | None = None
    ) -> str:
        hdr: dict[str, Any] = {} if self.kid is None else {"kid": self.kid}
        hdr.update(headers or {})
        return jwt.encode(claims, self.private_key, algorithm=alg or self.alg, headers=hdr)

    def sign_raw(self, header: bytes | str, payload: bytes | str, alg: str | None = None) -> str:
        """A validly signed JWS over hand-built header and payload bytes (duplicates, odd JSON...)."""
        signing_input = f"{b64url(header)}.{b64url(payload)}"
        algorithm = get_default_algorithms()[alg or self.alg]
        signature = algorithm.sign(signing_input.encode("ascii"), self.private_key)
        return f"{signing_input}.{b64url(signature)}"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.public_jwk)]}


def _public_jwk(private_key: Any, kid: str | None) -> dict[str, Any]:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk = json.loads(get_default_algorithms()["ES256"].to_jwk(private_key.public_key()))
    elif isinstance(private_key, rsa.RSAPrivateKey):
        jwk = json.loads(get_default_algorithms()["RS256"].to_jwk(private_key.public_key()))
    else:
        jwk = json.loads(get_default_algorithms()["EdDSA"].to_jwk(private_key.public_key()))
    jwk = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y", "n", "e")}
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def make_signer(alg: str = "ES256", kid: str | None = "auto") -> Signer:
    """A fresh key for ``alg``; ``kid="auto"`` uses the RFC 7638 thumbprint, ``None`` omits it."""
    if alg.startswith("ES"):
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        key: Any = ec.generate_private_key(curve)
    elif alg.startswith(("RS", "PS")):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(alg)
    jwk = _public_jwk(key, None)
    real_kid = jwk_thumbprint(jwk) if kid == "auto" else kid
    return Signer(alg, key, real_kid, _public_jwk(key, real_kid))


def claims(**overrides: Any) -> dict[str, Any]:
    """Good JWT-SVID claims at ``NOW``; pass ``name=DROP`` to remove one."""
    base: dict[str, Any] = {
        "iss": SPIFFE_ISS,
        "sub": "spiffe://example.org/assistants/refund-bot",
        "aud": AUDIENCE,
        "iat": NOW,
        "exp": NOW + 300,
        "jti": uuid.uuid4().hex,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def k8s_claims(namespace: str = "payments", name: str = "refund-bot", **overrides: Any) -> dict[str, Any]:
    base = claims(
        iss=K8S_ISS,
        sub=f"system:serviceaccount:{namespace}:{name}",
        **{
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": "6f3c9a0e-2b1d-4c1e-9a51-0d6f3c1b2a7e"},
                "pod": {"name": "refund-bot-7d9f8", "uid": "0a1b2c3d-0000-4000-8000-000000000001"},
            }
        },
    )
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def store(tmp_path: Path, clock: FixedClock) -> Iterator[SqliteStateStore]:
    s = SqliteStateStore(tmp_path / "state.db", clock=clock)
    yield s
    s.close_now()


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS that tests can rotate, break or stop."""

    def __init__(self) -> None:
        self.document: dict[str, Any] | bytes = {"keys": []}
        self.status = 200
        self.send_length = True
        self.redirect_to: str | None = None
        self.requests = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                if server.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", server.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.status != 200:
                    self.send_response(server.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                doc = server.document
                body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if server.send_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.stop()


class Kit:
    """Helpers handed to tests as a fixture (so test modules never import conftest)."""

    NOW = NOW
    AUDIENCE = AUDIENCE
    SPIFFE_ISS = SPIFFE_ISS
    K8S_ISS = K8S_ISS
    OIDC_ISS = OIDC_ISS
    JWT_TYPE = JWT_TYPE
    DROP = DROP
    b64url = staticmethod(b64url)
    make_signer = staticmethod(make_signer)
    claims = staticmethod(claims)
    k8s_claims = staticmethod(k8s_claims)


@pytest.fixture
def kit() -> Kit:
    return Kit()


class Harness:
    """An attestor trusting three issuers (spiffe-jwt, kubernetes, oidc), each with EC, RSA and
    Ed25519 keys, on a fixed clock and a real SQLite replay store."""

    def __init__(self, clock: FixedClock, store: SqliteStateStore) -> None:
        self.clock = clock
        self.store = store
        self.ec = make_signer("ES256")
        self.rsa = make_signer("RS256")
        self.ed = make_signer("EdDSA")
        self.jwks = {"keys": [self.ec.public_jwk, self.rsa.public_jwk, self.ed.public_jwk]}
        self.configs = [
            IssuerConfig(
                issuer=SPIFFE_ISS,
                kind="spiffe-jwt",
                audience=AUDIENCE,
                jwks_url="https://spire.example.org/keys",
                trust_domain="example.org",
            ),
            IssuerConfig(
                issuer=K8S_ISS,
                kind="kubernetes",
                audience=AUDIENCE,
                jwks_url="https://kubernetes.default.svc/openid/v1/jwks",
                trust_domain="cluster.example",
            ),
            IssuerConfig(
                issuer=OIDC_ISS,
                kind="oidc",
                audience=AUDIENCE,
                jwks_url="https://login.example.com/jwks",
                spiffe_id_template="spiffe://people.example/oidc/{sub}",
                require_jti=False,
            ),
        ]
        self.attestor = self.build()

    def build(self, configs: list[IssuerConfig] | None = None, **kwargs: Any) -> Attestor:
        configs = configs if configs is not None else self.configs
        sources = {c.issuer: JwksSource.from_jwks(self.jwks) for c in configs}
        return Attestor(configs, self.store, self.clock, jwks_sources=sources, **kwargs)

    def verify(self, token: str, token_type: str = JWT_TYPE) -> WorkloadIdentity:
        return run(self.attestor.verify(token, token_type))


@pytest.fixture
def h(clock: FixedClock, store: SqliteStateStore) -> Harness:
    return Harness(clock, store)
