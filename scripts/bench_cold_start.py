"""Cold start of a ledger of 1,000,000 entries: from recorded tile roots vs rebuilding the whole tree.

    .venv/bin/python scripts/bench_cold_start.py [--entries 1000000] [--keep DIR]

Writes a SQLite ledger of realistic-size entries (~600 bytes), publishes a checkpoint, then opens
it in a fresh process twice: once as a ledger without recorded tiles (what every start did before:
read every leaf hash and build the whole tree in memory) and once with its tile roots (the
interior hashes the writer records as tiles complete). Each line reports the open time, which
includes the start-up integrity check, the memory the tree holds, how many leaf hashes were
read, and how many leaves the check covered. Not a test: numbers for the README.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import SystemClock
from broker.ledger import Ledger, NoteSigner, SqliteLedgerStorage
from broker.ledger.canonical import encode_entry

ORIGIN = "bench.example/ledger"
KEY = b"\x09" * 32


class _Counting(SqliteLedgerStorage):
    hashes_read = 0
    leaves_read = 0

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        self.hashes_read += end - start
        return super().leaf_hashes(start, end)

    def entries(self, start: int, end: int) -> list[bytes]:
        self.leaves_read += end - start
        return super().entries(start, end)


def _entry(i: int) -> dict[str, object]:
    return {"v": 1, "kind": "issuance", "time": "2026-12-03T08:00:00Z", "request_id": f"req-{i:012d}",
            "workload": {"spiffe_id": "spiffe://example.org/ns/support/sa/support-assistant",
                         "attestation": "kubernetes", "issuer": "https://k8s.example.org",
                         "evidence_digest": "sha256:" + f"{i:064x}", "name": "support-assistant",
                         "owner": "Dana Reyes <dana.reyes@example.com>"},
            "audience": "payments-api",
            "intent": {"type": "intent", "action": "payments.refund", "resource": f"customers/c-{i % 977}/orders/o-{i}",
                       "context": {"customer": f"c-{i % 977}", "amount": i % 200, "currency": "EUR"}},
            "decision": {"effect": "allow", "rule": "refund-small-eur", "policy_version": "sha256:" + "ab" * 32},
            "credential": {"kind": "jwt", "jti": f"jti{i:020d}", "kid": "kid1", "iat": 1_800_000_000,
                           "exp": 1_800_000_300, "claims_sha256": "sha256:" + "cd" * 32}}


def _write(path: Path, n: int) -> None:
    storage = SqliteLedgerStorage(path)
    try:
        batch = 20_000
        for start in range(0, n, batch):
            storage.append_batch([encode_entry(_entry(i)) for i in range(start, min(n, start + batch))])
    finally:
        storage.close()
    # Opening it once records the tile roots and publishes a checkpoint over everything.
    with Ledger(SqliteLedgerStorage(path), NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(KEY)), ORIGIN,
                SystemClock()) as ledger:
        ledger.checkpoint()


def _open_once(path: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    storage = _Counting(path)
    started = time.perf_counter()
    ledger = Ledger(storage, NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(KEY)), ORIGIN, SystemClock())
    opened = time.perf_counter() - started
    size = ledger.size()
    # What the process holds of the tree (ru_maxrss would include what the parent had: it survives exec).
    tree_bytes = sum(len(level) for level in ledger._tree._levels)
    started = time.perf_counter()
    proof = ledger.inclusion_proof(size // 3, size)
    first_proof = time.perf_counter() - started
    ledger.close()
    out.put({"size": size, "open_s": round(opened, 3), "tree_mb": round(tree_bytes / 2**20, 2),
             "leaf_hashes_read": storage.hashes_read,
             "leaves_checked": storage.leaves_read, "first_proof_ms": round(first_proof * 1000, 2),
             "proof_len": len(proof)})


def _measure(path: Path) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    proc = ctx.Process(target=_open_once, args=(str(path), queue))
    proc.start()
    result: dict[str, object] = queue.get(timeout=1800)
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="directory for the ledger file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        path = Path(tmp) / "ledger.sqlite3"
        started = time.perf_counter()
        _write(path, args.entries)
        print(f"wrote {args.entries} entries ({path.stat().st_size / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - started:.1f} s")
        with_tiles = _measure(path)
        conn = sqlite3.connect(path)
        conn.execute("DELETE FROM tiles")  # as a ledger written before tile roots were recorded
        conn.commit()
        conn.close()
        without = _measure(path)
        print("rebuild whole tree (before):", json.dumps(without))
        print("from tile roots (after):    ", json.dumps(with_tiles))
        print(f"open: {without['open_s']} s -> {with_tiles['open_s']} s; leaf hashes read: "
              f"{without['leaf_hashes_read']} -> {with_tiles['leaf_hashes_read']}; start-up check covers "
              f"{with_tiles['leaves_checked']} leaves (bytes re-hashed) and every tile root against the "
              f"published checkpoints")


if __name__ == "__main__":
    main()
