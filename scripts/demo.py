#!/usr/bin/env python3
"""nhi-broker in one command: a broker, a protected refund service and a scripted support assistant.

    python scripts/demo.py            (after `pip install -e . ./clients/python`)

1. starts ``nhi-broker serve`` on embedded defaults (a temporary data dir, the trial identity issuer,
   the sample policies in ./policies) on a free loopback port;
2. starts an example orders service whose refund endpoint (audience ``payments-api``) is protected by
   the SDK's :class:`TaskTokenVerifier` (JWKS from the broker, DPoP, intent check);
3. runs a support assistant, with no LLM, acting for the signed-in customer c-42 (RFC 8693
   delegation: the trial user issuer stands in for the shop's login; the sample policy refunds only
   on behalf of the verified customer it refunds), that
   (a) refunds 20 EUR with a fresh DPoP-bound task token,
   (b) is denied a 500 EUR refund by the intent policy,
   (c) shows that a copied token replayed from another key is refused,
   (d) prints and checks the ledger proof of (a) against the signed checkpoint,
   (e) asks for a 120 EUR refund, which the policy holds for a person's approval: an approver
       approves it (through the admin API, as the console would), and the assistant's SDK collects
       the token with the approval bound in;
   (f) shows who it acts for: a refund for customer c-42 names c-42 as ``sub`` and the assistant as
       ``act``; a refund asked without the verified user, and a prompt-injected refund for another
       customer, are refused because the user is verified; a refund sub-agent gets a narrower token
       with a nested ``act``, never a wider one.

Exit status 0 when every step behaved as described; 1 otherwise. Nothing is left running.
"""

# No `from __future__ import annotations`: FastAPI must see the route's Annotated dependency as an object.
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import Depends, FastAPI
from nhi_broker_client import (
    AccessDeniedError,
    ApprovalPending,
    BrokerClient,
    BrokerResponseError,
    DPoPKey,
    TaskTokenVerifier,
    VerifiedTaskToken,
)
from nhi_broker_client.fastapi import TaskTokenDependency, install_exception_handlers
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
ASSISTANT = "spiffe://example.org/ns/support/sa/support-assistant"
CUSTOMER, ORDER = "c-42", "ord-1001"
RESOURCE = f"customers/{CUSTOMER}/orders/{ORDER}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str = "") -> None:
    print(text, flush=True)


class Refund(BaseModel):
    amount: float
    currency: str


def create_orders_app(verifier: TaskTokenVerifier) -> FastAPI:
    """The example orders service: refunds need a task token whose intent is exactly this refund."""
    app = FastAPI(title="orders service (example)")
    install_exception_handlers(app)
    task_token = Annotated[VerifiedTaskToken, Depends(TaskTokenDependency(verifier))]

    @app.post("/customers/{customer}/orders/{order}/refunds")
    def refund(customer: str, order: str, body: Refund, token: task_token) -> dict[str, Any]:
        amount = int(body.amount) if body.amount.is_integer() else body.amount
        token.require_intent("payments.refund", f"customers/{customer}/orders/{order}",
                             {"customer": customer, "amount": amount, "currency": body.currency})
        return {"refunded": amount, "currency": body.currency, "order": order, "by": token.subject,
                "owner": token.owner, "txn": token.txn}

    return app


class Broker:
    """``nhi-broker serve`` as a child process, in its own process group."""

    def __init__(self, data_dir: Path, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).with_name("nhi-broker")
        command = [str(exe)] if exe.exists() else [shutil.which("nhi-broker") or "nhi-broker"]
        self.proc = subprocess.Popen(
            [*command, "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--policies", str(REPO / "policies"), "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the broker exited: " + (self.proc.stdout.read() if self.proc.stdout else ""))
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the broker did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Service:
    """A uvicorn server in a thread (real HTTP on loopback) for any ASGI app."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the orders service did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def approver_config(workdir: Path) -> tuple[Path, str]:
    """A broker configuration with one refund approver, april (only her secret's SHA-256 is in it), and
    a 1 s approval polling interval; returns its path and april's bearer secret."""
    approver_secret = secrets.token_urlsafe(32)
    config = workdir / "broker.toml"
    config.write_text(
        "[approvals]\npoll_interval = 1\n\n"
        '[[operators]]\nname = "april"\nrole = "approver"\ngroups = ["refund-approvers"]\n'
        f'token_sha256 = "{hashlib.sha256(approver_secret.encode()).hexdigest()}"\n'
    )
    return config, approver_secret


def approve(broker_url: str, approver_secret: str, auth_req_id: str, reason: str) -> bool:
    """Approve a held intent through the admin API, as the console would."""
    r = httpx.post(f"{broker_url}/v1/admin/approvals/{auth_req_id}/approve", json={"reason": reason},
                   headers={"Authorization": f"Bearer {approver_secret}"})
    return r.status_code == 200


class LedgerProof:
    """One ledger entry, proven included in the broker's signed checkpoint (built by :func:`prove`)."""

    def __init__(self, index: int, leaf_hash: str, entry: dict[str, Any], checkpoint: Any, path_length: int,
                 verifier_key: str) -> None:
        self.index, self.leaf_hash, self.entry = index, leaf_hash, entry
        self.checkpoint, self.path_length, self.verifier_key = checkpoint, path_length, verifier_key


def prove(broker_url: str, leaf_hash_hex: str, http: httpx.Client | None = None) -> LedgerProof:
    """Fetch the signed checkpoint, the entry with this leaf hash and its RFC 6962 inclusion proof, and
    verify all three against the ledger's verifier key (raises if anything does not check out)."""
    from broker.ledger.checkpoint import verify_checkpoint
    from broker.ledger.merkle import leaf_hash, verify_inclusion

    if http is None:
        with httpx.Client() as own:
            return prove(broker_url, leaf_hash_hex, own)
    meta = http.get(broker_url + "/.well-known/oauth-authorization-server").json()
    checkpoint = verify_checkpoint(http.get(broker_url + "/v1/ledger/checkpoint").text, meta["ledger_verifier_key"])
    proof = http.get(broker_url + "/v1/ledger/proof/inclusion",
                     params={"leaf_hash": leaf_hash_hex, "tree_size": checkpoint.size}).json()
    index = int(proof["index"])
    path = [base64.b64decode(h) for h in proof["audit_path"]]
    verify_inclusion(bytes.fromhex(leaf_hash_hex), index, checkpoint.size, path, checkpoint.root)
    listed = http.get(broker_url + "/v1/ledger/entries", params={"start": index, "end": index + 1}).json()
    leaf = base64.b64decode(listed["entries"][0]["leaf"])
    if leaf_hash(leaf).hex() != leaf_hash_hex:
        raise ValueError("the entry does not hash to its leaf hash")
    return LedgerProof(index, leaf_hash_hex, json.loads(leaf), checkpoint, len(path), meta["ledger_verifier_key"])


def run(workdir: Path) -> bool:
    from broker.attest.dev import DevIssuer, DevUserIssuer
    from broker.clock import SystemClock

    ok = True

    def check(condition: bool, what: str) -> None:
        nonlocal ok
        if not condition:
            ok = False
            say(f"    !! unexpected: {what}")

    # One refund approver for (e): only the SHA-256 of her secret is in the broker's configuration.
    config, approver_secret = approver_config(workdir)
    broker = Broker(workdir / "broker-data", config)
    verifier = TaskTokenVerifier(broker.url, "payments-api")
    service = Service(create_orders_app(verifier))
    try:
        # The platform (here the broker's trial issuer) gives the assistant a short-lived identity.
        issuer = DevIssuer.load_or_create(workdir / "broker-data")

        def identity() -> str:
            return issuer.mint(ASSISTANT, "nhi-broker", clock=SystemClock())

        # The shop's login (here the broker's trial user issuer) signed the customer in; the assistant
        # passes the customer's token on, so the broker verifies who the refund is for.
        users = DevUserIssuer.load_or_create(workdir / "broker-data")

        def signed_in_user() -> str:
            return users.mint_user(CUSTOMER, "nhi-broker", clock=SystemClock())

        key = DPoPKey.generate()
        say("== nhi-broker demo ==")
        say(f"broker      {broker.url}  (embedded defaults, trial identity issuer)")
        say(f"orders svc  {service.url}  (audience payments-api; verifies task tokens with the broker's JWKS)")
        say(f"assistant   {ASSISTANT}")
        say(f"            acting for the signed-in customer {CUSTOMER} (trial user issuer)")
        say(f"            DPoP key {key.jkt} (never leaves the assistant)")
        refund_url = f"{service.url}/customers/{CUSTOMER}/orders/{ORDER}/refunds"
        with BrokerClient(broker.url, actor=identity, user_token=signed_in_user, dpop_key=key) as assistant:
            # (a)
            say()
            say(f"(a) refund 20 EUR on order {ORDER} of customer {CUSTOMER}")
            token = assistant.get_token("payments-api", "payments.refund", RESOURCE,
                                        {"customer": CUSTOMER, "amount": 20, "currency": "EUR"}, fresh=True)
            left = int(token.expires_at - time.time())
            say(f"    broker  issued a {token.token_type}-bound task token, valid {left} s, "
                f"ledger entry #{token.receipt_index}")
            r = httpx.post(refund_url, json={"amount": 20, "currency": "EUR"},
                           headers=token.headers("POST", refund_url))
            body = r.json()
            check(r.status_code == 200 and body.get("refunded") == 20, "the 20 EUR refund was not made")
            if r.status_code == 200:
                say(f"    orders  {r.status_code} REFUNDED {body['refunded']} {body['currency']} on {body['order']}")
                say(f"            by {body['by']} (owner {body['owner']}), ledger txn {body['txn'][:16]}...")
            else:
                say(f"    orders  {r.status_code} {json.dumps(body)}")

            # (b)
            say()
            say("(b) refund 500 EUR on the same order")
            try:
                assistant.get_token("payments-api", "payments.refund", RESOURCE,
                                    {"customer": CUSTOMER, "amount": 500, "currency": "EUR"})
                check(False, "the broker issued a token for a 500 EUR refund")
            except AccessDeniedError as exc:
                say(f"    broker  DENIED {exc.status} {exc.code}: {exc.description}")
            r = httpx.post(refund_url, json={"amount": 500, "currency": "EUR"},
                           headers=token.headers("POST", refund_url))
            say(f"    orders  with the 20 EUR token: {r.status_code} {r.json().get('error')}: "
                f"{r.json().get('error_description')}")
            check(r.status_code == 403, "the orders service accepted 500 EUR on a 20 EUR token")

        # (c)
        say()
        say("(c) the 20 EUR token leaks (a log line, a prompt injection) and is replayed from another key")
        stolen = token.access_token
        thief = DPoPKey.generate()
        r = httpx.post(refund_url, json={"amount": 20, "currency": "EUR"},
                       headers={"Authorization": f"DPoP {stolen}",
                                "DPoP": thief.proof("POST", refund_url, access_token=stolen)})
        detail = r.json().get("detail", {})
        say(f"    orders  {r.status_code} {detail.get('error')}: {detail.get('error_description')}")
        check(r.status_code == 401 and detail.get("error") == "invalid_dpop_proof", "the replayed token was accepted")
        r = httpx.post(refund_url, json={"amount": 20, "currency": "EUR"},
                       headers={"Authorization": f"Bearer {stolen}"})
        detail = r.json().get("detail", {})
        say(f"    orders  as a bearer token: {r.status_code} {detail.get('error')}: {detail.get('error_description')}")
        check(r.status_code == 401, "the token was accepted as a bearer token")
        say("    REFUSED: the token is useless without the assistant's key")

        # (d)
        say()
        say(f"(d) ledger proof of (a): entry #{token.receipt_index}")
        assert token.receipt_index is not None and token.receipt_leaf_hash is not None
        proven = prove(broker.url, token.receipt_leaf_hash)
        entry, checkpoint, index = proven.entry, proven.checkpoint, proven.index
        check(index == token.receipt_index, "the entry is not at the receipt's index")
        check(entry["kind"] == "issuance" and entry["credential"].get("cnf_jkt") == key.jkt,
              "the entry is not the DPoP-bound issuance of (a)")
        say(f"    entry      kind={entry['kind']} rule={entry['decision']['rule']} "
            f"workload={entry['workload'].get('spiffe_id')}")
        say(f"               owner={entry['workload'].get('owner')}")
        say(f"               intent={json.dumps(entry['intent'], sort_keys=True)}")
        say(f"               credential jti={entry['credential']['jti']} cnf_jkt={entry['credential']['cnf_jkt']}")
        say(f"    leaf hash  {token.receipt_leaf_hash}  (= the token's txn claim)")
        say(f"    checkpoint size={checkpoint.size} root={base64.b64encode(checkpoint.root).decode()}")
        say(f"               signature verified with {proven.verifier_key}")
        say(f"    inclusion  {proven.path_length}-hash audit path from leaf #{index} to the signed root: VERIFIED")

        # (e)
        say()
        say("(e) refund 120 EUR: above what the assistant may do alone, so a person must approve it")
        with BrokerClient(broker.url, actor=identity, user_token=signed_in_user, dpop_key=key) as assistant:
            try:
                assistant.get_token("payments-api", "payments.refund", RESOURCE,
                                    {"customer": CUSTOMER, "amount": 120, "currency": "EUR"})
                check(False, "the broker issued a 120 EUR refund token without an approval")
                say("demo FAILED")
                return False
            except ApprovalPending as held:
                pending = held
            say(f"    broker  HELD for review by rule {pending.rule_id} (OpenID CIBA poll mode, "
                f"auth_req_id {pending.auth_req_id[:12]}...)")
            reason = "customer sent photos of the damaged parcel"
            check(approve(broker.url, approver_secret, pending.auth_req_id, reason), "the approver could not approve")
            say(f"    april   (refund-approvers) APPROVED: {reason}")
            approved = assistant.wait_for_approval(pending, timeout=30)
        grant = json.loads(base64.urlsafe_b64decode(approved.access_token.split(".")[1] + "=="))["approval"]
        say(f"    broker  issued after approval by {', '.join(grant['approvers'])}; "
            f"approval entry {grant['txn'][:16]}... is in the ledger")
        r = httpx.post(refund_url, json={"amount": 120, "currency": "EUR"},
                       headers=approved.headers("POST", refund_url))
        check(r.status_code == 200 and r.json().get("refunded") == 120, "the approved refund was not made")
        if r.status_code == 200:
            say(f"    orders  {r.status_code} REFUNDED 120 EUR on {r.json()['order']}")

        # (f)
        say()
        say(f"(f) act for the verified end user {CUSTOMER} (signed in at the shop; RFC 8693 actor_token)")
        def claims_of(token: str) -> dict[str, Any]:
            parsed: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
            return parsed

        refund_ctx = {"customer": CUSTOMER, "amount": 30, "currency": "EUR"}
        with BrokerClient(broker.url, identity, dpop=False) as unverified:
            say(f"    without the user's token the customer is only the assistant's word for {CUSTOMER}")
            try:
                unverified.get_token("payments-api", "payments.refund", RESOURCE, refund_ctx)
                check(False, "the broker issued a refund without a verified end user")
            except AccessDeniedError as exc:
                say(f"    broker  DENIED {exc.status} {exc.code} by rule {exc.rule_id}")
                check(exc.rule_id == "refund-requires-verified-user", "the unverified refund was not refused")
        with BrokerClient(broker.url, actor=identity, user_token=signed_in_user, dpop=False) as assistant:
            delegated = assistant.get_token("payments-api", "payments.refund", RESOURCE, refund_ctx)
            claims = claims_of(delegated.access_token)
            check(claims.get("sub") == CUSTOMER and claims.get("act") == {"sub": ASSISTANT},
                  "the delegated token does not name the user and the assistant")
            say(f"    broker  issued: sub={claims['sub']} act={json.dumps(claims['act'])}")
            say(f"            sub_id={json.dumps(claims['sub_id'], sort_keys=True)}")
            other = "c-77"
            say(f"    a prompt injection makes the assistant ask for a refund to customer {other}")
            try:
                assistant.get_token("payments-api", "payments.refund", f"customers/{other}/orders/ord-7",
                                    {"customer": other, "amount": 30, "currency": "EUR"})
                check(False, "the broker issued a refund for a customer other than the verified user")
            except AccessDeniedError as exc:
                say(f"    broker  DENIED {exc.status} {exc.code} by rule {exc.rule_id}: the user is verified "
                    f"as {CUSTOMER}")
                check(exc.rule_id == "refund-other-customer", "the cross-customer refund was not refused by its rule")
        executor = "spiffe://example.org/ns/payments/sa/refund-executor"
        with BrokerClient(broker.url, lambda: issuer.mint(executor, "nhi-broker", clock=SystemClock()),
                          dpop=False) as sub_agent:
            child = sub_agent.narrow(delegated, "payments-api", "payments.refund", RESOURCE,
                                     {**refund_ctx, "amount": 25})
            child_claims = claims_of(child.access_token)
            say(f"    sub-agent refund-executor narrowed it to 25 EUR: act={json.dumps(child_claims['act'])}")
            check(child_claims.get("act") == {"sub": executor, "act": {"sub": ASSISTANT}}, "no nested act")
            try:
                sub_agent.narrow(delegated, "payments-api", "payments.refund", RESOURCE, {**refund_ctx, "amount": 45})
                check(False, "the sub-agent got a token wider than its parent")
            except BrokerResponseError as exc:
                say(f"    asking for 45 EUR (more than its parent's 30): {exc.status} {exc.code}: {exc.description}")
                check(exc.code == "invalid_target", "a wider child was not refused with invalid_target")
    finally:
        service.stop()
        verifier.close()
        broker.stop()
    say()
    say("demo OK" if ok else "demo FAILED")
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nhi-broker-demo-") as workdir:
        return 0 if run(Path(workdir)) else 1


if __name__ == "__main__":
    sys.exit(main())
