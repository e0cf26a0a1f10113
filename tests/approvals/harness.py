"""An in-process broker (real SQLite or Redis, real ledger) with approvers, and CIBA helpers."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
from fastapi.testclient import TestClient

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.clock import FixedClock
from broker.config import Settings
from broker.operators import hash_secret
from tests.helpers import POLICIES, SUPPORT, delegated_form, exchange_form, intent
from tests.state.conftest import SHARED_REDIS

CIBA = "urn:openid:params:grant-type:ciba"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
APRIL, OTTO, DANA, AUDREY, ADA = (
    "april-approver-secret-0123456789", "otto-approver-secret-0123456789",
    "dana-owner-secret-0123456789", "audrey-auditor-secret-0123456789", "ada-admin-secret-0123456789",
)
OPERATORS = [
    {"name": "april", "role": "approver", "token_sha256": hash_secret(APRIL), "groups": ["refund-approvers"]},
    {"name": "otto", "role": "approver", "token_sha256": hash_secret(OTTO), "groups": ["other-approvers"]},
    # The support assistant's own accountable owner, also a refund approver.
    {"name": "dana.reyes@example.com", "role": "approver", "token_sha256": hash_secret(DANA),
     "groups": ["refund-approvers"]},
    {"name": "audrey", "role": "auditor", "token_sha256": hash_secret(AUDREY)},
    {"name": "ada", "role": "admin", "token_sha256": hash_secret(ADA)},
]


def refund(amount: Any, customer: str = "c-42") -> str:
    """An EUR refund intent for one order of ``customer``."""
    return intent("payments.refund", f"customers/{customer}/orders/ord-1001", customer=customer, amount=amount,
                  currency="EUR", conversation="conv-7")


def approval_settings(data_dir: Path, backend: str, prefix: str, policies: Path = POLICIES, **extra: Any) -> Settings:
    """Settings with the approvers above and a one-second poll interval."""
    return Settings(
        data_dir=data_dir, policies_dir=policies, state_backend=backend, redis_url=SHARED_REDIS,
        redis_prefix=prefix, operators=OPERATORS, approvals={"poll_interval": 1, **extra},
    )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Harness:
    """The app under a fixed clock, and what a workload and an approver do with it."""

    def __init__(self, client: TestClient, settings: Settings, clock: FixedClock) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.issuer = DevIssuer.load_or_create(settings.data_dir)
        self.users = DevUserIssuer.load_or_create(settings.data_dir)

    def identity(self, spiffe_id: str = SUPPORT) -> str:
        return self.issuer.mint(spiffe_id, "nhi-broker", ttl=300, clock=self.clock)

    def user(self, subject: str = "c-42") -> str:
        """A token of the verified end user ``subject`` (trial user issuer)."""
        return self.users.mint_user(subject, "nhi-broker", ttl=300, clock=self.clock)

    def exchange(self, details: str, spiffe_id: str = SUPPORT, user: str | None = "c-42") -> Any:
        """An exchange at payments-api; delegated for end user ``user`` (refunds need one), plain if ``None``."""
        if user is None:
            form = exchange_form(self.identity(spiffe_id), "payments-api", details)
        else:
            form = delegated_form(self.user(user), self.identity(spiffe_id), "payments-api", details)
        return self.client.post("/v1/token", data=form)

    def hold(self, amount: Any = 120) -> str:
        r = self.exchange(refund(amount))
        assert r.status_code == 200, r.text
        assert set(r.json()) == {"auth_req_id", "expires_in", "interval", "rule_id"}
        return str(r.json()["auth_req_id"])

    def poll(self, auth_req_id: str, spiffe_id: str = SUPPORT, **extra: str) -> Any:
        form = {"grant_type": CIBA, "auth_req_id": auth_req_id, "subject_token": self.identity(spiffe_id),
                "subject_token_type": JWT_TYPE, **extra}
        return self.client.post("/v1/token", data=form)

    def decide(self, auth_req_id: str, verb: str, secret: str = APRIL, reason: str = "checked the order") -> Any:
        return self.client.post(f"/v1/admin/approvals/{auth_req_id}/{verb}", json={"reason": reason},
                                headers=bearer(secret))

    def claims(self, token: str, audience: str = "payments-api") -> dict[str, Any]:
        """The claims of a task token the app issued, once pyjwt verified its signature against the app's
        JWKS and its audience; its times are checked against the harness's clock (pyjwt knows only the
        real one)."""
        jwks = self.client.get("/.well-known/jwks.json").json()
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == kid))
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=[key.algorithm_name], audience=audience,
            options={"require": ["exp", "iat", "jti"], "verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
        now = self.clock.now()
        assert claims["iat"] <= now < claims["exp"], (claims["iat"], now, claims["exp"])
        assert claims.get("nbf", claims["iat"]) <= now
        return claims

    def ledger(self) -> list[dict[str, Any]]:
        size = int(self.client.get("/v1/ledger/checkpoint").text.splitlines()[1])
        if size == 0:
            return []
        body = self.client.get("/v1/ledger/entries", params={"start": 0, "end": size}).json()
        return [json.loads(base64.b64decode(e["leaf"])) for e in body["entries"]]

    def leaf_hashes(self) -> list[str]:
        size = int(self.client.get("/v1/ledger/checkpoint").text.splitlines()[1])
        body = self.client.get("/v1/ledger/entries", params={"start": 0, "end": size}).json()
        return [e["leaf_hash"] for e in body["entries"]]
