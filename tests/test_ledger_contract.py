"""Every kind of entry the broker writes passes the auditors' offline verifier (docs/ledger.md).

One live broker goes through every feature that writes to the ledger — issuance (bearer and
DPoP-bound), policy denial, budget denial, scoped revocation, suspension and its refusal, resume —
and then ``nhi-broker audit verify`` must accept the whole log, entry schemas included, and every
entry must validate against the JSON Schema ``nhi-broker ledger schema`` prints (checked by an
independent validator, ``jsonschema``), which is also the file docs/ledger.md links.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
from nhi_broker_client import BrokerClient, BrokerResponseError

from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.audit import HttpLedgerSource
from broker.audit._canonical import decode_leaf
from broker.audit.schema import validate_entry
from broker.clock import SystemClock
from tests.helpers import SUPPORT, LiveBroker, delegated_form, exchange_form, form_body, intent

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ORDER = "customers/c-42/orders/ord-1001"


def test_every_entry_kind_the_broker_writes_verifies(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[[operators]]\nname = "ops-lead"\nrole = "admin"\n'
        f'token_sha256 = "{hashlib.sha256(secret.encode()).hexdigest()}"\n'
    )
    broker = LiveBroker(tmp_path / "data", config=config)
    try:
        issuer = DevIssuer.load_or_create(tmp_path / "data")

        def identity() -> str:
            return issuer.mint(SUPPORT, "nhi-broker", ttl=300, clock=SystemClock())

        users = DevUserIssuer.load_or_create(tmp_path / "data")

        def customer() -> str:  # the verified end user refunds are for (delegated exchanges)
            return users.mint_user("c-42", "nhi-broker", clock=SystemClock())

        admin = {"Authorization": f"Bearer {secret}"}
        with httpx.Client(base_url=broker.url) as http:
            def bearer_exchange(details: str, audience: str) -> httpx.Response:
                return http.post("/v1/token", content=form_body(exchange_form(identity(), audience, details)),
                                 headers=FORM)

            assert bearer_exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api").status_code == 200
            with BrokerClient(broker.url, actor=identity, user_token=customer) as client:  # DPoP-bound
                client.get_token("payments-api", "payments.refund", ORDER,
                                 {"customer": "c-42", "amount": 20, "currency": "EUR", "conversation": "conv-1"})
                # The sample budget: 200 EUR of refunds per conversation per day.
                refused = None
                for _ in range(10):
                    try:
                        client.get_token("payments-api", "payments.refund", ORDER,
                                         {"customer": "c-42", "amount": 50, "currency": "EUR",
                                          "conversation": "conv-2"}, fresh=True)
                    except BrokerResponseError as exc:
                        refused = exc
                        break
                assert refused is not None and refused.code == "budget_exceeded"
            over = intent("payments.refund", ORDER, customer="c-42", amount=500, currency="EUR")
            assert bearer_exchange(over, "payments-api").status_code == 403  # no verified user
            delegated = delegated_form(customer(), identity(), "payments-api", over)
            assert http.post("/v1/token", content=form_body(delegated), headers=FORM).status_code == 403
            r = http.post("/v1/admin/revocations", headers=admin,
                          json={"scope": "conversation", "value": "conv-1", "reason": "contract test"})
            assert r.status_code == 200, r.text
            r = http.post("/v1/admin/workloads/support-assistant/suspend", headers=admin,
                          json={"reason": "contract test"})
            assert r.status_code == 200, r.text
            assert bearer_exchange(intent("orders.read", ORDER, customer="c-42"), "orders-api").status_code == 403
            r = http.post("/v1/admin/workloads/support-assistant/resume", headers=admin,
                          json={"reason": "contract test"})
            assert r.status_code == 200, r.text
            verifier_key = http.get("/.well-known/oauth-authorization-server").json()["ledger_verifier_key"]

        exe = Path(sys.executable).with_name("nhi-broker")
        run = subprocess.run([str(exe), "audit", "verify", "--url", broker.url, "--verifier-key", verifier_key,
                              "--json"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        summary = json.loads(run.stdout)
        kinds = summary["by_kind"]
        for kind in ("issuance", "denial", "revocation", "suspension", "policy_load", "key_rotation"):
            assert kinds.get(kind, 0) >= 1, (kind, kinds)
        validator = printed_schema_validator()
        source = HttpLedgerSource(broker.url)
        try:
            entries = [decode_leaf(raw.leaf) for raw in source.entries(0, summary["size"])]
        finally:
            source.close()
        assert len(entries) == summary["size"]
        for index, entry in enumerate(entries):
            problems = sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path))
            assert not problems, (index, entry["kind"], [p.message for p in problems])
    finally:
        broker.stop()


def printed_schema() -> dict[str, object]:
    """What `nhi-broker ledger schema` prints (its own process)."""
    exe = Path(sys.executable).with_name("nhi-broker")
    run = subprocess.run([str(exe), "ledger", "schema"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    schema: dict[str, object] = json.loads(run.stdout)
    return schema


def printed_schema_validator() -> jsonschema.Draft202012Validator:
    schema = printed_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_linked_schema_file_is_what_the_cli_prints() -> None:
    linked = json.loads((Path(__file__).parent.parent / "docs" / "ledger-entry.schema.json").read_text())
    assert linked == printed_schema(), "regenerate: nhi-broker ledger schema > docs/ledger-entry.schema.json"


def test_schema_and_validator_agree_on_attacks() -> None:
    """Each attack the auditors' validator refuses, the JSON Schema refuses too, unless it is one of
    the rules JSON Schema cannot state (documented in the schema's description)."""
    from tests.audit.test_audit_units import ISSUANCE, KEY_ROTATION, SCHEMA_ATTACKS

    validator = printed_schema_validator()
    assert validator.is_valid(ISSUANCE) and validator.is_valid(KEY_ROTATION)
    beyond_json_schema = {"time-calendar", "spiffe", "exp-before-iat", "jwk-kid"}
    for name, entry, member, _ in SCHEMA_ATTACKS:
        try:
            validate_entry(entry)
            refused = False
        except Exception:
            refused = True
        assert refused, name
        assert validator.is_valid(entry) == (name in beyond_json_schema), (name, member)
