"""Micro-measure of the ledger (not a test): group-commit throughput and proof latency at 1M leaves.

    .venv/bin/python scripts/bench_ledger.py [--threads 64] [--seconds 5] [--leaves 1000000]

Uses a temporary SQLite file on the local disk (real fsyncs) and prints one line per figure.
Bounded: about 30-40 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.clock import SystemClock
from broker.ledger import (
    Ledger,
    MerkleTree,
    NoteSigner,
    SqliteLedgerStorage,
    verify_checkpoint,
    verify_inclusion,
)

ORIGIN = "bench.example/ledger"


def make_ledger(path: Path) -> Ledger:
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    return Ledger(SqliteLedgerStorage(path), signer, ORIGIN, SystemClock())


def bench_appends(directory: Path, threads: int, seconds: float) -> None:
    led = make_ledger(directory / "appends.sqlite3")
    stop = time.monotonic() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        n = 0
        mine = []
        while time.monotonic() < stop:
            entry = {"v": 1, "kind": "issuance", "request_id": f"t{t}-{n}", "time": "2026-11-02T10:00:00Z"}
            start = time.perf_counter()
            led.append(entry)
            mine.append(time.perf_counter() - start)
            n += 1
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - began
    size = led.size()
    led.close()
    latencies.sort()
    print(
        f"appends: {threads} threads, {size} durable appends in {elapsed:.1f} s = {size / elapsed:,.0f}/s; "
        f"latency p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
        f"p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms"
    )


def bench_tree(leaves: int) -> None:
    hashes = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(leaves)]
    began = time.perf_counter()
    tree = MerkleTree(hashes)
    print(f"tree: built from {leaves:,} leaf hashes in {time.perf_counter() - began:.2f} s")
    rng = random.Random(1)
    samples = []
    for _ in range(2000):
        size = rng.randint(1, leaves)
        index = rng.randrange(size)
        began = time.perf_counter()
        proof = tree.inclusion_proof(index, size)
        samples.append(time.perf_counter() - began)
        verify_inclusion(hashes[index], index, size, proof, tree.root(size))
    samples.sort()
    print(
        f"tree: inclusion proof at any size <= {leaves:,}: median {statistics.median(samples) * 1e3:.3f} ms, "
        f"p99 {samples[int(len(samples) * 0.99)] * 1e3:.3f} ms, max {samples[-1] * 1e3:.3f} ms"
    )


def bench_ledger_proofs(directory: Path, leaves: int) -> None:
    path = directory / "big.sqlite3"
    storage = SqliteLedgerStorage(path)
    began = time.perf_counter()
    chunk = 100_000
    for start in range(0, leaves, chunk):
        storage.append_batch([f"entry-{i}".encode() for i in range(start, min(leaves, start + chunk))])
    storage.close()
    print(f"ledger: stored {leaves:,} leaves in {time.perf_counter() - began:.1f} s (bulk batches)")
    led = make_ledger(path)
    began = time.perf_counter()
    note = led.checkpoint()  # catches the in-memory tree up from storage
    print(f"ledger: first checkpoint (tree catch-up from SQLite) in {time.perf_counter() - began:.2f} s")
    head = verify_checkpoint(note, led.verifier_key, ORIGIN)
    rng = random.Random(2)
    samples = []
    for _ in range(2000):
        index = rng.randrange(head.size)
        began = time.perf_counter()
        led.inclusion_proof(index, head.size)
        samples.append(time.perf_counter() - began)
    index = rng.randrange(head.size)
    verify_inclusion(
        hashlib.sha256(b"\x00" + f"entry-{index}".encode()).digest(),
        index,
        head.size,
        led.inclusion_proof(index, head.size),
        head.root,
    )
    led.close()
    samples.sort()
    print(
        f"ledger: Ledger.inclusion_proof at {head.size:,} leaves (incl. storage size check): "
        f"median {statistics.median(samples) * 1e3:.3f} ms, "
        f"p99 {samples[int(len(samples) * 0.99)] * 1e3:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--leaves", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        directory = Path(tmp)
        bench_appends(directory, args.threads, args.seconds)
        bench_tree(args.leaves)
        bench_ledger_proofs(directory, args.leaves)


if __name__ == "__main__":
    main()
