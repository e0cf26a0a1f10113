"""Micro-measure of the ledger (not a test): group-commit throughput, proof latency and `audit verify` at 1M.

    .venv/bin/python scripts/bench_ledger.py [--threads 64] [--seconds 5] [--leaves 1000000] [--skip-verify]
    .venv/bin/python scripts/bench_ledger.py --url postgresql://postgres@127.0.0.1:5432/test \
        [--processes 4] [--tasks 256] [--seconds 5] [--leaves 1000000]

Uses a temporary SQLite file on the local disk (real fsyncs) and prints one line per figure. With
``--url``, the same figures on PostgreSQL: a temporary schema in that database (dropped at the end),
``--processes`` broker-like processes (replicas' worth of writers, each with its own Ledger and
writer thread) with ``--tasks`` concurrent ``append_async`` callers each, durable appends/s across all
of them, then 1,000,000 leaves, the cold-start catch-up of a replica, and proof latency. The
`audit verify` figure writes an export bundle of realistic issuance entries (~1 KB each, 1.3 GB at
1M) and verifies it exactly as `nhi-broker audit verify --bundle` does. Bounded: about 2 minutes
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from benchinfo import load_average, markdown_caption
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
# (figure, target, measured) for --markdown, in the order measured.
FIGURES: list[tuple[str, str, str]] = []


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
    p50, p99 = latencies[len(latencies) // 2] * 1e3, latencies[int(len(latencies) * 0.99)] * 1e3
    print(
        f"appends: {threads} threads, {size} durable appends in {elapsed:.1f} s = {size / elapsed:,.0f}/s; "
        f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    FIGURES.append((f"durable appends/s with group commit ({threads} threads, SQLite WAL, `synchronous=FULL`)",
                    ">= 5,000/s", f"{size / elapsed:,.0f}/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms"))


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
    catch_up = time.perf_counter() - began
    print(f"ledger: first checkpoint (tree catch-up from SQLite) in {catch_up:.2f} s")
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
    median, p99 = statistics.median(samples) * 1e3, samples[int(len(samples) * 0.99)] * 1e3
    print(
        f"ledger: Ledger.inclusion_proof at {head.size:,} leaves (incl. storage size check): "
        f"median {median:.3f} ms, p99 {p99:.3f} ms"
    )
    FIGURES.append((f"`Ledger.inclusion_proof` at {head.size:,} leaves", "< 5 ms",
                    f"median {median:.3f} ms, p99 {p99:.3f} ms"))
    FIGURES.append((f"tree catch-up from SQLite at {head.size:,} leaves (first checkpoint, and start-up)", "",
                    f"{catch_up:.1f} s"))


def _issuance_template() -> bytes:
    """A canonical (RFC 8785) issuance leaf with fixed-width %-placeholders; filling them keeps it canonical."""
    import rfc8785

    h = "sha256:" + "0" * 64
    entry = {
        "v": 1, "kind": "issuance", "time": "TIME_", "request_id": "REQ_",
        "workload": {"spiffe_id": "spiffe://example.org/ns/support/sa/WL_", "attestation": "kubernetes",
                     "issuer": "https://k8s.example.org", "evidence_digest": "EVIDENCE_", "name": "WL_",
                     "owner": "OWNER_"},
        "audience": "payments-api",
        "intent": {"type": "intent", "action": "payments.refund", "resource": "customers/c-42/orders/ORDER_",
                   "context": {"customer": "c-42", "amount": 20, "currency": "EUR"}},
        "decision": {"effect": "allow", "rule": "refund-small-eur", "policy_version": h},
        "credential": {"kind": "jwt", "jti": "JTI_", "kid": "kid-2026-11", "iat": 1795434438, "exp": 1795434558,
                       "claims_sha256": h},
    }  # fmt: skip
    template = rfc8785.dumps(entry)
    for token, spec in [(b"TIME_", b"%(time)s"), (b"REQ_", b"req-%(i)012d"), (b"WL_", b"assistant-%(w)02d"),
                        (b"EVIDENCE_", b"sha256:%(i)064x"), (b"OWNER_", b"Owner %(w)02d <owner%(w)02d@example.com>"),
                        (b"ORDER_", b"ord-%(i)d"), (b"JTI_", b"jti%(i)019d")]:  # fmt: skip
        template = template.replace(token, spec)
    return template


def bench_audit_verify(directory: Path, leaves: int, jobs: int) -> None:
    from broker.audit import BundleLedgerSource, verify_ledger
    from broker.audit.bundle import write_bundle
    from broker.ledger import leaf_hash, sign_checkpoint

    template = _issuance_template()

    def leaf(i: int) -> bytes:
        t = 1_795_000_000 + i // 50
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)).encode()
        return template % {b"time": stamp, b"i": i, b"w": i % 50}

    began = time.perf_counter()
    tree = MerkleTree(leaf_hash(leaf(i)) for i in range(leaves))
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    note = sign_checkpoint(signer, ORIGIN, leaves, tree.root())
    bundle = directory / "ledger.bundle"
    write_bundle(bundle, origin=ORIGIN, checkpoint=note, size=leaves, verifier_key=signer.verifier_key,
                 leaves=(leaf(i) for i in range(leaves)))
    print(f"audit: wrote a bundle of {leaves:,} issuance entries ({bundle.stat().st_size / 1e9:.2f} GB) "
          f"in {time.perf_counter() - began:.1f} s")
    began = time.perf_counter()
    verified = verify_ledger(BundleLedgerSource(bundle), signer.verifier_key, origin=ORIGIN, jobs=jobs)
    elapsed = time.perf_counter() - began
    assert verified.summary.size == leaves and verified.summary.by_kind["issuance"] == leaves
    print(f"audit: verify (checkpoint, every leaf hash, canonical form and schema, root) of {leaves:,} entries "
          f"with {jobs} process(es) in {elapsed:.1f} s = {leaves / elapsed:,.0f} entries/s")
    FIGURES.append((f"`audit verify` of a {leaves:,}-entry export bundle (~1 KB issuance entries: checkpoint, every "
                    f"leaf hash, RFC 8785 form, schema, root), {jobs} process(es)", "< 60 s at 1,000,000",
                    f"{elapsed:.1f} s = {leaves / elapsed:,.0f} entries/s"))
    bundle.unlink()


def _pg_appender(url: str, tasks: int, seconds: float, start_at: float, out: Any) -> None:
    """One replica's worth of appenders: a Ledger (one writer thread) and ``tasks`` async callers."""
    import asyncio

    from broker.ledger.postgres import PostgresLedgerStorage

    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x09" * 32))
    led = Ledger(PostgresLedgerStorage(url), signer, ORIGIN, SystemClock())
    pid = os.getpid()

    async def run() -> list[float]:
        latencies: list[float] = []
        while time.time() < start_at:
            await asyncio.sleep(0.01)
        stop = time.monotonic() + seconds

        async def caller(t: int) -> None:
            n = 0
            while time.monotonic() < stop:
                entry = {"v": 1, "kind": "issuance", "request_id": f"p{pid}-t{t}-{n}", "time": "2026-11-02T10:00:00Z"}
                began = time.perf_counter()
                await led.append_async(entry)
                latencies.append(time.perf_counter() - began)
                n += 1

        await asyncio.gather(*(caller(t) for t in range(tasks)))
        return latencies

    try:
        cpu = time.process_time()
        latencies = asyncio.run(run())
        # When this process's last append was acknowledged, and the CPU it spent (all its threads).
        out.put((latencies, time.time(), time.process_time() - cpu))
    finally:
        led.close()


def bench_pg_appends(url: str, processes: int, tasks: int, seconds: float) -> None:
    import multiprocessing

    from broker.ledger.postgres import PostgresLedgerStorage

    before = PostgresLedgerStorage(url)
    size_before = before.size()
    before.close()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0  # every process connected and warmed before the clock starts
    procs = [ctx.Process(target=_pg_appender, args=(url, tasks, seconds, start_at, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    latencies: list[float] = []
    ended = start_at
    cpu = 0.0
    for _ in procs:
        mine, finished, spent = out.get()
        latencies.extend(mine)
        ended = max(ended, finished)
        cpu += spent
    for p in procs:
        p.join()
    storage = PostgresLedgerStorage(url)
    size = storage.size()
    assert len(set(storage.leaf_hashes(0, size))) == size  # every index present, every leaf distinct
    storage.close()
    appended = size - size_before
    assert appended == len(latencies)  # every acknowledged append is stored, nothing else was
    elapsed = ended - start_at  # from the common start to the last acknowledgement
    latencies.sort()
    print(
        f"postgres appends: {processes} processes x {tasks} concurrent callers, {appended:,} durable appends "
        f"(synchronous_commit=on) in {elapsed:.1f} s = {appended / elapsed:,.0f}/s; latency p50 "
        f"{latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms; "
        f"appenders' CPU {cpu / appended * 1e6:.0f} us per append"
    )


def bench_pg_batches(url: str, seconds: float) -> None:
    """One writer, no Ledger: durable commits/s and rows/s by batch size (the sequencer's two limits)."""
    from broker.ledger.postgres import PostgresLedgerStorage

    storage = PostgresLedgerStorage(url)
    try:
        for size in (1, 10, 100, 1000):
            began = time.perf_counter()
            batches = 0
            while time.perf_counter() - began < seconds / 4:
                storage.append_batch([f"batch-{size}-{batches}-{i}-".encode() + b"x" * 400 for i in range(size)])
                batches += 1
            elapsed = time.perf_counter() - began
            print(f"postgres sequencer: batches of {size:>4}: {batches / elapsed:,.0f} commits/s = "
                  f"{batches * size / elapsed:,.0f} rows/s (~420-byte leaves, one writer)")
    finally:
        storage.close()


def bench_signing() -> None:
    from broker.ledger import sign_checkpoint

    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    root = hashlib.sha256(b"root").digest()
    began = time.perf_counter()
    n = 2000
    for i in range(n):
        sign_checkpoint(signer, ORIGIN, i, root)
    per = (time.perf_counter() - began) / n
    hashes = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(200_000)]
    began = time.perf_counter()
    MerkleTree(hashes)
    hashing = (time.perf_counter() - began) / len(hashes)
    print(f"cpu: checkpoint signing (Ed25519 signed note) {per * 1e6:.0f} us; tree hashing {hashing * 1e6:.2f} us "
          f"per appended leaf (interior nodes, amortised)")


def bench_pg_proofs(url: str, leaves: int) -> None:
    from broker.ledger.postgres import PostgresLedgerStorage

    storage = PostgresLedgerStorage(url)
    have = storage.size()
    began = time.perf_counter()
    chunk = 50_000
    for start in range(have, leaves, chunk):
        storage.append_batch([f"entry-{i}".encode() for i in range(start, min(leaves, start + chunk))])
    size = storage.size()
    storage.close()
    print(f"postgres: stored {size - have:,} more leaves ({size:,} in all) in {time.perf_counter() - began:.1f} s "
          "(bulk batches)")
    signer = NoteSigner(ORIGIN, Ed25519PrivateKey.from_private_bytes(b"\x09" * 32))
    began = time.perf_counter()
    led = Ledger(PostgresLedgerStorage(url), signer, ORIGIN, SystemClock())
    note = led.checkpoint()  # a cold replica: catches its tree up from storage, then signs
    print(f"postgres: cold replica start, tree caught up from storage and first checkpoint signed at "
          f"{size:,} leaves in {time.perf_counter() - began:.2f} s")
    began = time.perf_counter()
    led.check_integrity()
    print(f"postgres: start-up integrity check in {time.perf_counter() - began:.2f} s")
    head = verify_checkpoint(note, led.verifier_key, ORIGIN)
    rng = random.Random(2)
    samples = []
    for _ in range(2000):
        index = rng.randrange(head.size)
        began = time.perf_counter()
        proof = led.inclusion_proof(index, head.size)
        samples.append(time.perf_counter() - began)
    index = head.size - 1
    verify_inclusion(led.entries(index, index + 1)[0] and
                     hashlib.sha256(b"\x00" + led.entries(index, index + 1)[0]).digest(),
                     index, head.size, led.inclusion_proof(index, head.size), head.root)
    led.close()
    samples.sort()
    del proof
    print(
        f"postgres: Ledger.inclusion_proof at {head.size:,} leaves (incl. the storage size query): "
        f"median {statistics.median(samples) * 1e3:.3f} ms, p99 {samples[int(len(samples) * 0.99)] * 1e3:.3f} ms"
    )


def run_postgres(args: argparse.Namespace) -> None:
    import uuid

    import psycopg

    from broker.pg import connect, upgrade

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in args.url else "?"
    url = f"{args.url}{sep}options=" + urllib.parse.quote(f"-c search_path={schema}")
    try:
        with connect(url, autocommit=True) as conn:
            upgrade(conn)
        bench_signing()
        bench_pg_batches(url, args.seconds)
        bench_pg_appends(url, args.processes, args.tasks, args.seconds)
        bench_pg_proofs(url, args.leaves)
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--skip-verify", action="store_true", help="skip the `audit verify` figure")
    parser.add_argument("--jobs", type=int, default=1, help="`audit verify` processes (the CLI's default: 1)")
    parser.add_argument("--url", help="postgresql://... : measure the PostgreSQL ledger (a temporary schema)")
    parser.add_argument("--processes", type=int, default=4, help="with --url: appending processes (replicas)")
    parser.add_argument("--tasks", type=int, default=256, help="with --url: concurrent appenders per process")
    parser.add_argument("--markdown", action="store_true", help="also print the table for the README")
    args = parser.parse_args()
    start_load = load_average()
    if args.url:
        run_postgres(args)
        return
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        directory = Path(tmp)
        bench_appends(directory, args.threads, args.seconds)
        bench_tree(args.leaves)
        bench_ledger_proofs(directory, args.leaves)
        if not args.skip_verify:
            bench_audit_verify(directory, args.leaves, args.jobs)
    if args.markdown:
        print()
        print(markdown_caption(start_load) + " Local disk.\n")
        print("| figure | target | measured |")
        print("|---|---|---|")
        for figure, target, measured in FIGURES:
            print(f"| {figure} | {target} | {measured} |")


if __name__ == "__main__":
    main()
