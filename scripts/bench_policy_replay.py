"""`nhi-broker policy replay` over a verified ledger of 100,000 entries (target: under 60 s here).

    .venv/bin/python scripts/bench_policy_replay.py [--entries 100000] [--keep DIR]

Writes a SQLite ledger of realistic issuance and denial entries (varied customers, orders and
amounts, so few requests repeat), exports it as a bundle, and times the CLI path end to end:
verify the whole bundle with the verifier key, then re-decide every recorded request under a
candidate policy set (the sample policies with the small-refund cap lowered from 50 to 10 EUR and
the review threshold moved with it). Prints the seconds and the first lines of the report. Not a
test: numbers for the README.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import BundleLedgerSource
from broker.audit.bundle import write_bundle
from broker.clock import SystemClock
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage
from broker.ledger.canonical import encode_entry
from broker.ledger.checkpoint import verify_checkpoint
from broker.policy import load_policies
from broker.policy.replay import replay_ledger

ORIGIN = "bench.example/ledger"
POLICIES = Path(__file__).resolve().parent.parent / "policies"
SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"
VERSION = "sha256:" + "ab" * 32
USERS = "https://login.example.org"


def _workload(i: int) -> dict[str, object]:
    return {"spiffe_id": SUPPORT, "attestation": "kubernetes", "issuer": "https://k8s.example.org",
            "evidence_digest": "sha256:" + f"{i:064x}", "name": "support-assistant",
            "owner": "Dana Reyes <dana.reyes@example.com>"}


def _entry(i: int, rng: random.Random) -> dict[str, object]:
    customer = f"c-{rng.randrange(5000)}"
    amount = rng.choice([5, 12, 20, 35, 48, 60, 120, 480, 700])
    intent = {"type": "intent", "action": "payments.refund",
              "resource": f"customers/{customer}/orders/o-{rng.randrange(10**6)}",
              "context": {"customer": customer, "amount": amount, "currency": "EUR"}}
    base = {"v": 1, "time": f"2026-11-{1 + i * 30 // 100_000 % 30:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
            "request_id": f"req-{i:012d}", "workload": _workload(i), "audience": "payments-api", "intent": intent,
            # Refunds are delegated: the verified customer the assistant acts for (docs/delegation.md).
            "user": {"iss": USERS, "sub": customer, "evidence_digest": "sha256:" + f"{i:064x}"}}
    if amount <= 50:
        return {**base, "kind": "issuance",
                "decision": {"effect": "allow", "rule": "refund-small-eur", "policy_version": VERSION},
                "credential": {"kind": "jwt", "jti": f"jti{i:020d}", "kid": "kid1", "iat": 1_800_000_000,
                               "exp": 1_800_000_120, "claims_sha256": "sha256:" + "cd" * 32}}
    return {**base, "kind": "denial",
            "decision": {"effect": "deny", "rule": None, "policy_version": VERSION, "error": "access_denied",
                         "reason": "no rule allows payments.refund"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, help="directory for the files (default: a temporary one)")
    args = parser.parse_args()
    rng = random.Random(13)
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        db, bundle = Path(tmp) / "ledger.sqlite3", Path(tmp) / "ledger.bundle"
        storage = SqliteLedgerStorage(db)
        for start in range(0, args.entries, 10_000):
            end = min(args.entries, start + 10_000)
            storage.append_batch([encode_entry(_entry(i, rng)) for i in range(start, end)])
        storage.close()
        signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
        with Ledger(SqliteLedgerStorage(db), signer, ORIGIN, SystemClock()) as ledger:
            note = ledger.checkpoint()
            size = verify_checkpoint(note, signer.verifier_key).size
            write_bundle(bundle, origin=ORIGIN, checkpoint=note, size=size, verifier_key=signer.verifier_key,
                         leaves=(leaf for s in range(0, size, 1000) for leaf in ledger.entries(s, s + 1000)))
        candidate = Path(tmp) / "candidate"
        shutil.copytree(POLICIES, candidate)
        text = (candidate / "policy.csv").read_text()
        text = text.replace("amount > 0 && amount <= 50", "amount > 0 && amount <= 10")
        text = text.replace("amount > 50 && amount < 500", "amount > 10 && amount < 500")
        (candidate / "policy.csv").write_text(text)

        started, cpu = time.perf_counter(), time.process_time()
        report = replay_ledger(BundleLedgerSource(bundle), signer.verifier_key, load_policies(candidate))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"policy replay: {size} entries verified and {report.replayed} requests re-decided in "
              f"{elapsed:.1f} s wall, {cpu:.1f} s CPU ({size / elapsed:,.0f} entries/s; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
        print("\n".join(report.lines()[:8]))


if __name__ == "__main__":
    main()
