"""``nhi-broker audit verify|prove|consistency|witness|report`` and ``nhi-broker ledger export|schema|rotate-key``.

Audit commands trust only the verifier key given with ``--verifier-key`` (the ``<name>+<keyid>+<base64>``
line `nhi-broker serve` prints), never a key the source offers. Exit status (:mod:`broker.cli._exit`):
0 verified, 1 integrity failure, 2 usage, 3 rollback or fork (evidence printed), 4 the source is
unreachable or a file cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.audit.errors import AuditFailure, ConsistencyViolation, SourceUnavailable
from broker.cli._exit import exit_status
from broker.errors import BrokerError, VerificationError

__all__ = ["register"]



def _add_source(p: argparse.ArgumentParser, *, key_required: bool = True, entry_proof: bool = False) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running broker, e.g. http://127.0.0.1:8080")
    where.add_argument("--bundle", type=Path, help="a file written by `nhi-broker ledger export`")
    if entry_proof:
        where.add_argument("--entry-proof", type=Path,
                           help="one entry with its inclusion proof and checkpoint (the console's download)")
    p.add_argument("--verifier-key", required=key_required, action="append",
                   help="the ledger's signed-note verifier key, obtained out of band (<name>+<keyid>+<base64>); "
                        "repeat to trust several (oldest first)")
    p.add_argument("--origin", help="the log identity (checkpoint origin) to insist on")


@contextmanager
def _open_source(args: argparse.Namespace) -> Iterator[Any]:
    from broker.audit.bundle import BundleLedgerSource
    from broker.audit.live import HttpLedgerSource

    _check_keys(args)
    if args.url is not None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per page is noise here
        source: Any = HttpLedgerSource(args.url)  # a malformed URL is a usage error (ValueError)
    elif getattr(args, "entry_proof", None) is not None:
        from broker.audit.entry_proof import EntryProofSource

        source = EntryProofSource.from_file(args.entry_proof)
    else:
        source = BundleLedgerSource(args.bundle)
    try:
        yield source
    finally:
        source.close()


def _err(message: str) -> None:
    print(f"nhi-broker: {message}", file=sys.stderr)


class UsageError(ValueError):
    """A malformed argument: nothing was checked (exit status 2)."""


def _check_keys(args: argparse.Namespace) -> None:
    """Refuse malformed verifier keys before reading anything: a typo is not a failed audit."""
    from broker.ledger.checkpoint import NoteVerifier

    for key in getattr(args, "verifier_key", None) or []:
        try:
            NoteVerifier.from_verifier_key(key)
        except ValueError as exc:
            raise UsageError(f"malformed verifier key {key[:60]!r}: {exc}") from None


def _rotation_notice(signed_by: str, trusted: list[str]) -> None:
    """Say so when the checkpoint was signed by a key the ledger endorsed, not one given."""
    if signed_by and signed_by not in trusted:
        print(f"note: the ledger key was rotated; the checkpoint is signed by {signed_by}, "
              "endorsed in the ledger by a key you trust", file=sys.stderr)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn audit failures into one precise line (and evidence for violations), never a traceback.

    The exit status tells them apart (:func:`broker.cli._exit.exit_status`).
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ConsistencyViolation as exc:
            _err(f"LEDGER CONSISTENCY VIOLATION ({exc.kind}): {exc}")
            print("--- previously verified checkpoint ---", file=sys.stderr)
            print(exc.previous, end="", file=sys.stderr)
            print("--- latest checkpoint ---", file=sys.stderr)
            print(exc.latest, end="", file=sys.stderr)
            return exit_status(exc)
        except AuditFailure as exc:
            _err(f"ledger does NOT verify: {exc}")
            return exit_status(exc)
        except SourceUnavailable as exc:
            _err(f"cannot read the ledger: {exc}")
            return exit_status(exc)
        except OSError as exc:
            _err(f"cannot read or write a file: {exc.strerror or exc} ({exc.filename})")
            return exit_status(exc)
        except (VerificationError, BrokerError, ValueError) as exc:
            _err(str(exc))
            return exit_status(exc)

    return run


def _top(counter: Any, limit: int = 20) -> list[list[Any]]:
    return [[name, count] for name, count in counter.most_common(limit)]


def _cmd_verify(args: argparse.Namespace) -> int:
    from broker.audit.monitor import load_state, load_state_hashes
    from broker.audit.verify import verify_ledger
    from broker.cli._progress import ProgressBar

    trusted = load_state(args.state) if args.state else None
    trusted_hashes = load_state_hashes(args.state) if trusted is not None else None
    if args.trusted_checkpoint:
        trusted, trusted_hashes = args.trusted_checkpoint.read_text(encoding="utf-8"), None
    started = time.monotonic()
    bar = ProgressBar("verifying", force=args.progress)
    with _open_source(args) as source:
        stated = getattr(source, "stated_verifier_key", None)
        if stated is not None and stated not in args.verifier_key:
            print("note: the bundle names a different verifier key than the one you trust", file=sys.stderr)
        try:
            verified = verify_ledger(source, args.verifier_key, origin=args.origin, trusted_note=trusted,
                                     trusted_leaf_hashes=trusted_hashes, progress=bar, jobs=args.jobs)
        finally:
            bar.close()
    elapsed = time.monotonic() - started
    if args.state:
        from broker.audit.monitor import save_state

        # With the leaf hashes (32 bytes an entry), the next run names the exact entry a rewrite changed.
        save_state(args.state, verified.note, verified.tree.nodes(0, 0, verified.checkpoint.size))
    s, cp = verified.summary, verified.checkpoint
    if args.json:
        print(json.dumps({
            "verified": True, "origin": cp.origin, "size": cp.size, "root": base64.b64encode(cp.root).decode(),
            "by_kind": dict(s.by_kind), "by_workload": dict(s.by_workload), "by_owner": dict(s.by_owner),
            "first_time": s.first_time, "last_time": s.last_time, "seconds": round(elapsed, 3),
            "signed_by": verified.signed_by,
        }, sort_keys=True))
        return 0
    print(f"ledger {cp.origin} verified: {cp.size} entries, root {base64.b64encode(cp.root).decode()}")
    if verified.signed_by not in args.verifier_key:
        print(f"  signed by     {verified.signed_by} (the ledger key was rotated; the new key is endorsed in "
              "the ledger by a key you trust)")
    print(f"  time range   {s.first_time or '-'} .. {s.last_time or '-'}")
    print("  by kind      " + (", ".join(f"{k} {n}" for k, n in sorted(s.by_kind.items())) or "-"))
    for title, counter in (("by workload", s.by_workload), ("by owner", s.by_owner)):
        print(f"  {title}")
        for name, count in _top(counter):
            print(f"    {count:>9}  {name}")
        if len(counter) > 20:
            print(f"    ... and {len(counter) - 20} more")
    print(f"  checked in {elapsed:.1f} s")
    return 0


def _cmd_prove(args: argparse.Namespace) -> int:
    from broker.audit.prove import prove_attribution

    token = args.token
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip()
    for name, value in (("--token", token), ("--jti", args.jti), ("--leaf-hash", args.leaf_hash)):
        if value is not None and not value.strip():
            raise UsageError(f"{name} is empty")
    if token is None and args.jti is None and args.leaf_hash is None and args.entry_proof is None:
        raise UsageError("give one of --token, --token-file, --jti or --leaf-hash")
    with _open_source(args) as source:
        leaf_hash_hex = args.leaf_hash
        if token is None and args.jti is None and leaf_hash_hex is None:
            leaf_hash_hex = source.leaf_hash  # an entry proof names its one entry
        attribution = prove_attribution(source, args.verifier_key, token=token, jti=args.jti,
                                        leaf_hash_hex=leaf_hash_hex, origin=args.origin)
    _rotation_notice(attribution.signed_by, args.verifier_key)
    print("\n".join(attribution.lines()))
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    from broker.audit.monitor import check_consistency

    with _open_source(args) as source:
        result = check_consistency(source, args.verifier_key, args.state, origin=args.origin)
    _rotation_notice(result.signed_by, args.verifier_key)
    cp = result.checkpoint
    if result.previous is None:
        print(f"first checkpoint recorded: {cp.origin} size {cp.size} (state in {args.state})")
    else:
        print(f"consistent: {cp.origin} grew from {result.previous.size} to {cp.size} entries")
    return 0


def _cmd_witness(args: argparse.Namespace) -> int:
    import httpx

    from broker.audit.monitor import check_consistency
    from broker.audit.witness import WitnessSigner
    from broker.mint.keys import load_or_create_private_key

    key, created = load_or_create_private_key(args.witness_key, "EdDSA")
    signer = WitnessSigner(args.name, key)  # type: ignore[arg-type]
    if created:
        print(f"new witness key; its verifier key: {signer.verifier_key}", file=sys.stderr)
    with _open_source(args) as source:
        consistent = check_consistency(source, args.verifier_key, args.state, origin=args.origin)
    _rotation_notice(consistent.signed_by, args.verifier_key)
    cosigned = signer.cosign(consistent, int(time.time()))
    print(cosigned, end="")
    if args.publish:
        if args.url is None:
            raise ValueError("--publish needs --url")
        try:
            response = httpx.post(args.url.rstrip("/") + "/v1/ledger/cosignatures", content=cosigned.encode(),
                                  headers={"Content-Type": "text/plain; charset=utf-8"}, timeout=30)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"cannot publish the cosignature: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise SourceUnavailable(f"the broker refused the cosignature: HTTP {response.status_code} "
                                    f"{response.text[:200]}")
        print("published", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import datetime
    import os
    import shutil
    import subprocess
    import tempfile

    from broker.audit.report import build_report, render_html
    from broker.cli.policy_cmd import _utc_bound

    since, until = _utc_bound(args.since, "--since"), _utc_bound(args.until, "--until")
    converter = None
    if args.pdf is not None:
        converter = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"),
                                      shutil.which("google-chrome")) if p), None)
        if converter is None:
            raise UsageError("--pdf needs chromium (or google-chrome) on PATH to print the report")
    with _open_source(args) as source:
        report = build_report(source, args.verifier_key, since=since, until=until)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    tmp = args.out.with_name(args.out.name + ".partial")
    tmp.write_text(render_html(report, now), encoding="utf-8")
    os.replace(tmp, args.out)
    _rotation_notice(report.signed_by, args.verifier_key)
    print(f"report of {report.size} verified entries written to {args.out}")
    if converter is not None:
        with tempfile.TemporaryDirectory() as profile:
            run = subprocess.run(
                [converter, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                 "--no-pdf-header-footer", f"--print-to-pdf={args.pdf.resolve()}", args.out.resolve().as_uri()],
                capture_output=True, timeout=120, check=False,
            )
        if run.returncode != 0 or not args.pdf.is_file():
            raise OSError(f"{converter} could not print the PDF (exit {run.returncode})")
        print(f"PDF written to {args.pdf}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from broker.audit.bundle import write_bundle
    from broker.cli._progress import ProgressBar

    bar = ProgressBar("exporting", force=args.progress)
    if args.url is not None:
        from broker.audit.live import HttpLedgerSource
        from broker.ledger.checkpoint import verify_checkpoint

        logging.getLogger("httpx").setLevel(logging.WARNING)
        source = HttpLedgerSource(args.url)
        try:
            note = source.checkpoint()
            # The export records which key it saw; the auditor still brings their own.
            key = args.verifier_key or source.verifier_key()
            if key is None:
                raise ValueError("the broker advertises no verifier key; pass --verifier-key")
            cp = verify_checkpoint(note, key)

            def leaves() -> Iterator[bytes]:
                for raw in source.entries(0, cp.size):
                    if raw.index % 1024 == 0:
                        bar(raw.index, cp.size)
                    yield raw.leaf

            n = write_bundle(args.output, origin=cp.origin, checkpoint=note, size=cp.size, verifier_key=key,
                             leaves=leaves())
        finally:
            source.close()
            bar.close()
    else:
        n = _export_local(args, bar)
    print(f"exported {n} entries to {args.output}")
    return 0


def _export_local(args: argparse.Namespace, bar: Callable[[int, int], None]) -> int:
    """Export straight from a data directory (the broker may be running: SQLite WAL readers are safe)."""
    from broker.audit.bundle import write_bundle
    from broker.cli.main import _settings
    from broker.clock import SystemClock
    from broker.ledger import Ledger, NoteSigner
    from broker.ledger.checkpoint import verify_checkpoint
    from broker.ledger.engines import is_shared, open_ledger_storage, sqlite_path
    from broker.mint.keys import _load

    settings = _settings(args)
    key_path = settings.data_dir / "keys" / "ledger-key.pem"
    url = settings.ledger_storage_url
    if not key_path.is_file() or not (is_shared(url) or sqlite_path(url).is_file()):
        raise ValueError(f"no ledger in {settings.data_dir} (run `nhi-broker serve` first, or pass --url)")
    signer = NoteSigner(settings.ledger_key_name or settings.ledger_origin, _load(key_path, "EdDSA"))  # type: ignore[arg-type]
    ledger = Ledger(open_ledger_storage(url), signer, settings.ledger_origin, SystemClock())
    try:
        note = ledger.checkpoint()
        cp = verify_checkpoint(note, signer.verifier_key)

        def leaves() -> Iterator[bytes]:
            for start in range(0, cp.size, 1000):
                bar(start, cp.size)
                yield from ledger.entries(start, min(cp.size, start + 1000))

        return write_bundle(args.output, origin=cp.origin, checkpoint=note, size=cp.size,
                            verifier_key=signer.verifier_key, leaves=leaves())
    finally:
        ledger.close()


def _cmd_schema(args: argparse.Namespace) -> int:
    from broker.ledger.schema import entry_json_schema

    # The same models build and validate entries; this is their generated JSON Schema.
    print(json.dumps(entry_json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_rotate_key(args: argparse.Namespace) -> int:
    from broker.cli.main import _settings
    from broker.clock import SystemClock
    from broker.ledger.rotation import rotate_ledger_key

    settings = _settings(args)
    if not (settings.data_dir / "keys" / "ledger-key.pem").is_file():
        raise ValueError(f"no ledger key in {settings.data_dir}")
    old, new = rotate_ledger_key(settings.data_dir, settings.ledger_key_name or settings.ledger_origin,
                                 settings.ledger_origin, SystemClock(), settings.ledger_url)
    print(f"ledger key rotated; the rotation is entry-recorded and endorsed by the old key\n"
          f"  old verifier key  {old}\n  new verifier key  {new}\n"
          "running brokers sign with the new key once its file reaches them (no restart; copy it to every replica)")
    return 0


def register(sub: Any) -> None:
    """Add the ``audit`` and ``ledger`` command groups to the ``nhi-broker`` parser."""
    from broker.cli.main import _add_common

    audit = sub.add_parser("audit", help="verify the ledger offline, trusting only its verifier key")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)

    verify = audit_sub.add_parser("verify", help="check every entry against the signed checkpoint")
    _add_source(verify)
    verify.add_argument("--trusted-checkpoint", type=Path, help="an earlier signed checkpoint the log must extend")
    verify.add_argument("--state", type=Path,
                        help="monitor state file: the log must extend it; updated on success, with the leaf hashes "
                             "(FILE.leaves) that locate a later rewrite exactly")
    verify.add_argument("--json", action="store_true", help="print the summary as JSON")
    # One process by default: on the 2-core reference machine a second one did not pay for the
    # hand-off (see README, Performance); more cores may differ.
    verify.add_argument("--jobs", type=int, default=1,
                        help="processes that decode and validate entries of large ledgers (default 1)")
    verify.add_argument("--progress", action="store_true", help="draw the progress bar even when not a terminal")
    verify.set_defaults(func=_guard(_cmd_verify))

    prove = audit_sub.add_parser("prove", help="attribute a credential: its entry, proven in the signed tree")
    _add_source(prove, entry_proof=True)
    query = prove.add_mutually_exclusive_group()
    query.add_argument("--token", help="a task token (its txn claim names the entry)")
    query.add_argument("--token-file", type=Path, help="a file holding a task token")
    query.add_argument("--jti", help="the token id recorded at issuance (scans the ledger)")
    query.add_argument("--leaf-hash", help="the receipt's leaf hash (64 hex digits)")
    prove.set_defaults(func=_guard(_cmd_prove))

    cons = audit_sub.add_parser("consistency", help="check the log only grew since the last run (state file)")
    _add_source(cons)
    cons.add_argument("--state", type=Path, required=True, help="where the last verified checkpoint is kept")
    cons.set_defaults(func=_guard(_cmd_consistency))

    wit = audit_sub.add_parser("witness", help="cosign the checkpoint once verified consistent (C2SP tlog-cosignature)")
    _add_source(wit)
    wit.add_argument("--state", type=Path, required=True, help="the witness's last verified checkpoint")
    wit.add_argument("--witness-key", type=Path, required=True, help="Ed25519 PEM key (created if absent, mode 0600)")
    wit.add_argument("--name", required=True, help="the witness name, e.g. witness.example.com/w1")
    wit.add_argument("--publish", action="store_true", help="send the cosignature to the broker (--url)")
    wit.set_defaults(func=_guard(_cmd_witness))

    rep = audit_sub.add_parser("report", help="write a self-contained HTML report of the verified ledger "
                                              "(and a PDF with --pdf)")
    _add_source(rep)
    rep.add_argument("--since", metavar="TIME", help="only entries at or after this UTC time (RFC 3339 or a date)")
    rep.add_argument("--until", metavar="TIME", help="only entries before this UTC time (RFC 3339 or a date)")
    rep.add_argument("--out", type=Path, required=True, help="the HTML file to write")
    rep.add_argument("--pdf", type=Path, help="also print the report to this PDF (needs chromium)")
    rep.set_defaults(func=_guard(_cmd_report))

    ledger = sub.add_parser("ledger", help="the broker's own ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)
    export = ledger_sub.add_parser("export", help="write a self-contained bundle for offline audit")
    export.add_argument("output", type=Path, help="the bundle file to write")
    export.add_argument("--url", help="export from a running broker instead of the data directory")
    export.add_argument("--verifier-key", help="with --url: the key to record (default: the one the broker advertises)")
    export.add_argument("--progress", action="store_true", help="draw the progress bar even when not a terminal")
    _add_common(export)
    export.set_defaults(func=_guard(_cmd_export))
    schema = ledger_sub.add_parser("schema", help="print the JSON Schema of ledger entries (version 1)")
    schema.set_defaults(func=_guard(_cmd_schema))
    rotate = ledger_sub.add_parser("rotate-key", help="rotate the checkpoint signing key, recorded in the ledger")
    _add_common(rotate)
    rotate.set_defaults(func=_guard(_cmd_rotate_key))
