"""A delegated intent held for review keeps its verified end user: the approvers see it, the approval
entry records it, and the token collected by the workload's CIBA poll has ``sub`` = the user and
``act`` = the workload (over real HTTP against ``nhi-broker serve``)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.attest.dev import DEV_USER_ISSUER, DevIssuer, DevUserIssuer
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker, exchange_form, intent

CLOCK = SystemClock()
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
APPROVER = "april-approver-secret-for-delegation-0123"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    root = tmp_path_factory.mktemp("deleg-review")
    config = root / "broker.toml"
    config.write_text(
        "[approvals]\npoll_interval = 1\n\n"
        '[[operators]]\nname = "april"\nrole = "approver"\ngroups = ["refund-approvers"]\n'
        f'token_sha256 = "{hashlib.sha256(APPROVER.encode()).hexdigest()}"\n'
    )
    live = LiveBroker(root / "data", config=config)
    try:
        yield live
    finally:
        live.stop()


def _identity(broker: LiveBroker) -> str:
    return DevIssuer.load_or_create(Path(broker.data_dir)).mint(SUPPORT, "nhi-broker", clock=CLOCK)


def _user(broker: LiveBroker, subject: str) -> str:
    return DevUserIssuer.load_or_create(Path(broker.data_dir)).mint_user(subject, "nhi-broker", clock=CLOCK)


def _refund(customer: str, amount: int) -> str:
    return intent("payments.refund", f"customers/{customer}/orders/ord-1", customer=customer, amount=amount,
                  currency="EUR", conversation=uuid.uuid4().hex)


def _delegated(broker: LiveBroker, subject: str, details: str) -> httpx.Response:
    form = exchange_form(_user(broker, subject), "payments-api", details, actor_token=_identity(broker),
                         actor_token_type=JWT_TYPE)
    return httpx.post(broker.url + "/v1/token", data=form, timeout=30)


def _claims(token: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return parsed


def test_held_delegated_refund_is_issued_for_the_verified_user(broker: LiveBroker) -> None:
    held = _delegated(broker, "c-42", _refund("c-42", 120))
    assert held.status_code == 200, held.text
    auth_req_id = held.json()["auth_req_id"]
    approvers = {"Authorization": f"Bearer {APPROVER}"}
    view = httpx.get(f"{broker.url}/v1/admin/approvals", headers=approvers).json()
    pending = next(p for p in view["requests"] if p["auth_req_id"] == auth_req_id)
    assert pending["user"] == {"iss": DEV_USER_ISSUER, "sub": "c-42"}  # the approver sees who it is for
    with httpx.Client(base_url=broker.url) as console:
        login = console.get("/console/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', login)
        assert csrf is not None
        signed_in = console.post("/console/login", data={"csrf": csrf.group(1), "credential": APPROVER})
        assert signed_in.status_code in (200, 303), signed_in.text
        page = console.get(f"/console/approvals/{auth_req_id}").text
        assert 'Verified end user</dt><dd><code id="end-user">c-42</code>' in page
    r = httpx.post(f"{broker.url}/v1/admin/approvals/{auth_req_id}/approve", json={"reason": "ok"},
                   headers=approvers)
    assert r.status_code == 200, r.text
    poll = {"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id,
            "subject_token": _identity(broker), "subject_token_type": JWT_TYPE}
    issued = httpx.post(broker.url + "/v1/token", data=poll, timeout=30)
    assert issued.status_code == 200, issued.text
    claims = _claims(issued.json()["access_token"])
    assert claims["sub"] == "c-42" and claims["act"] == {"sub": SUPPORT}
    assert claims["sub_id"] == {"format": "iss_sub", "iss": DEV_USER_ISSUER, "sub": "c-42"}
    assert claims["approval"]["approvers"] == ["april"]
    # The approval entry and the issuance entry both record the verified user.
    size = int(httpx.get(broker.url + "/v1/ledger/checkpoint").text.splitlines()[1])
    for leaf_hash in (claims["approval"]["txn"], claims["txn"]):
        proof = httpx.get(broker.url + "/v1/ledger/proof/inclusion",
                          params={"leaf_hash": leaf_hash, "tree_size": size}).json()
        index = proof["index"]
        body = httpx.get(broker.url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
        entry = json.loads(base64.b64decode(body["entries"][0]["leaf"]))
        assert entry["user"]["sub"] == "c-42" and entry["user"]["iss"] == DEV_USER_ISSUER


def test_held_cross_customer_refund_is_denied_not_held(broker: LiveBroker) -> None:
    r = _delegated(broker, "c-42", _refund("c-77", 120))
    assert (r.status_code, r.json()["error"], r.json()["rule_id"]) == (403, "access_denied", "refund-other-customer")
