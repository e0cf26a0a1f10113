"""``nhi-broker policy test|explain|lint|replay``: the security engineer's tools for a policy directory.

Exit codes: 0 success; 1 a refused policy set, a failing test case or bad input; 2 usage errors
(from argparse). ``replay`` follows the ledger's exit statuses (docs/ledger.md) and adds 5: more
recorded requests would change than ``--max-changes`` allows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from broker.errors import BrokerError, InvalidAuthorizationDetails, PolicyLoadError
from broker.intent import CONTEXT_KEY_RE, parse_intent
from broker.models import EndUser, WorkloadIdentity
from broker.policy import PolicySet, load_policies
from broker.policy.registry import ATTESTATION_METHODS
from broker.policy.testing import lint_policies, run_policy_tests

__all__ = ["register"]

DEFAULT_POLICIES = Path("policies")


def _print_refusal(exc: PolicyLoadError, out: TextIO) -> None:
    print(
        f"policy set refused ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):", file=out
    )
    for problem in exc.problems:
        print(f"  {problem}", file=out)


def _load(directory: Path) -> PolicySet | None:
    try:
        return load_policies(directory)
    except PolicyLoadError as exc:
        _print_refusal(exc, sys.stderr)
        return None


def _cmd_lint(args: argparse.Namespace) -> int:
    try:
        policy_set, cases = lint_policies(args.policies)
    except PolicyLoadError as exc:
        _print_refusal(exc, sys.stderr)
        return 1
    print(f"ok: {len(policy_set.rules)} rules, {len(policy_set.registry)} workloads, {cases} test cases")
    print(f"version {policy_set.version}")
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    policy_set = _load(args.policies)
    if policy_set is None:
        return 1
    try:
        results = run_policy_tests(policy_set, args.policies / "tests.toml")
    except PolicyLoadError as exc:
        _print_refusal(exc, sys.stderr)
        return 1
    failed = sum(1 for r in results if not r.passed)
    passed = len(results) - failed
    if args.format == "json":
        print(json.dumps({
            "policy_version": policy_set.version, "passed": passed, "failed": failed,
            "cases": [{"name": r.name, "passed": r.passed, "outcome": r.outcome, "rule_id": r.rule_id,
                       "max_ttl": r.max_ttl, "message": r.message, "source": r.case.source} for r in results],
        }, indent=2))
        return 1 if failed or not results else 0
    for result in results:
        if result.passed:
            print(f"PASS  {result.name}")
        else:
            print(f"FAIL  {result.name}: {result.message}  [{result.case.source}]")
    print(f"\n{passed} passed, {failed} failed ({policy_set.version})")
    if not results:
        print("no test cases: add [[case]] tables to tests.toml", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _cmd_explain(args: argparse.Namespace) -> int:
    context: Any = {}
    if args.context is not None:
        try:
            context = json.loads(args.context)
        except ValueError:
            print("--context must be a JSON object", file=sys.stderr)
            return 1
    try:
        intent = parse_intent(
            {"type": "intent", "action": args.action, "resource": args.resource, "context": context}
        )
    except InvalidAuthorizationDetails as exc:
        # The broker answers such requests before the policy runs; say so rather than explain.
        print(f"the broker refuses this intent before policy: {exc.description}", file=sys.stderr)
        return 1
    user = None
    if args.user_sub is not None or args.user_claim:
        if not args.user_sub or not args.user_iss:
            print("--user-sub and --user-iss go together (a delegated request's verified end user)", file=sys.stderr)
            return 1
        claims: dict[str, Any] = {}
        for item in args.user_claim or []:
            name, sep, value = item.partition("=")
            if not sep or CONTEXT_KEY_RE.fullmatch(name) is None:
                print(f"--user-claim {item!r} must be name=value with a lower-case name", file=sys.stderr)
                return 1
            claims[name] = value
        user = EndUser(issuer=args.user_iss, subject=args.user_sub, claims=claims)
    policy_set = _load(args.policies)
    if policy_set is None:
        return 1
    identity = WorkloadIdentity(
        spiffe_id=args.workload,
        issuer="nhi-broker policy explain",
        method=args.method,
        subject=args.workload,
        evidence_digest="sha256:" + "0" * 64,
        expires_at=0,
    )
    try:
        workload = policy_set.resolve_workload(identity)
    except BrokerError as exc:
        print(f"unregistered: {exc.description}")
        return 1
    explanation = policy_set.explain(workload, args.audience, intent, user)
    outside = args.audience not in workload.audiences
    if args.format == "json":
        print(json.dumps({**explanation.to_json(), "audience_registered": not outside}, indent=2))
        return 0
    if outside:
        print(
            f"note: {args.audience!r} is not one of {workload.name}'s audiences "
            f"({', '.join(workload.audiences) or 'none'}): the broker answers invalid_target before policy\n"
        )
    print(explanation.render())
    return 0


EXIT_OVER_THRESHOLD = 5


def _utc_bound(value: str | None, flag: str) -> str | None:
    """An RFC 3339 UTC time (``...Z``) or a date, as the fixed-width form entries record."""
    import re

    if value is None:
        return None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value + "T00:00:00Z"
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", value):
        return value
    raise ValueError(f"{flag} must be YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)")


def _cmd_replay(args: argparse.Namespace) -> int:
    from broker.audit import BundleLedgerSource, HttpLedgerSource
    from broker.cli._exit import EXIT_USAGE, exit_status
    from broker.cli.audit_cmd import UsageError, _check_keys
    from broker.policy.replay import replay_ledger

    try:
        since, until = _utc_bound(args.since, "--since"), _utc_bound(args.until, "--until")
        if args.max_changes is not None and args.max_changes < 0:
            raise UsageError("--max-changes must be 0 or more")
        _check_keys(args)
    except ValueError as exc:
        print(f"nhi-broker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    policies = _load(args.policies)
    if policies is None:
        return EXIT_USAGE
    try:
        ledger = args.ledger
        source: Any = HttpLedgerSource(ledger) if ledger.startswith(("http://", "https://")) \
            else BundleLedgerSource(Path(ledger))
        try:
            report = replay_ledger(source, args.verifier_key, policies, since=since, until=until)
        finally:
            source.close()
    except Exception as exc:  # the ledger's own errors, mapped to the audit exit statuses
        from broker.audit.errors import ConsistencyViolation, SourceUnavailable
        from broker.errors import VerificationError

        if not isinstance(exc, VerificationError | SourceUnavailable | ValueError | OSError | BrokerError):
            raise
        what = "LEDGER CONSISTENCY VIOLATION" if isinstance(exc, ConsistencyViolation) else "ledger does NOT verify"
        if isinstance(exc, SourceUnavailable | OSError):
            what = "cannot read the ledger"
        elif isinstance(exc, ValueError) and not isinstance(exc, VerificationError):
            what = "usage"
        print(f"nhi-broker: {what}: {exc}", file=sys.stderr)
        return exit_status(exc)
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True, ensure_ascii=False))
    else:
        print("\n".join(report.lines()))
    if args.max_changes is not None and report.changed > args.max_changes:
        print(f"nhi-broker: {report.changed} recorded request(s) would change, more than --max-changes "
              f"{args.max_changes}", file=sys.stderr)
        return EXIT_OVER_THRESHOLD
    return 0


def register(subparsers: Any) -> None:
    """Add ``policy test|explain|lint`` to the ``nhi-broker`` subcommands."""
    policy = subparsers.add_parser(
        "policy",
        help="test, explain and lint intent policies",
        description="Test, explain and lint an intent-policy directory (model.conf, policy.csv, "
        "workloads.toml, tests.toml).",
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    def add_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--policies",
            type=Path,
            default=DEFAULT_POLICIES,
            metavar="DIR",
            help="policy directory (default: ./policies)",
        )

    def add_format(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=("table", "json"), default="table", help="output format")

    test = commands.add_parser("test", help="run the cases in tests.toml; exit 1 on any failure")
    add_dir(test)
    add_format(test)
    test.set_defaults(func=_cmd_test)

    explain = commands.add_parser("explain", help="show which rule decides a request, and why")
    explain.add_argument("--workload", required=True, metavar="SPIFFE_ID", help="the attested SPIFFE ID")
    explain.add_argument("--audience", required=True, metavar="A", help="the requested audience")
    explain.add_argument("--action", required=True, metavar="X", help="e.g. payments.refund")
    explain.add_argument("--resource", required=True, metavar="R", help="e.g. customers/c-1/orders/o-9")
    explain.add_argument("--context", metavar="JSON", help="intent context, e.g. '{\"amount\": 20}'")
    explain.add_argument(
        "--method",
        default="spiffe-jwt",
        choices=sorted(ATTESTATION_METHODS),
        help="attestation method of the identity (default: spiffe-jwt)",
    )
    explain.add_argument("--user-sub", metavar="SUB", help="a delegated request: the verified end user's subject")
    explain.add_argument("--user-iss", metavar="ISS", help="... and its user issuer",
                         default=None)
    explain.add_argument("--user-claim", metavar="NAME=VALUE", action="append",
                         help="a mapped claim of the user (user.NAME in conditions); repeatable")
    add_dir(explain)
    add_format(explain)
    explain.set_defaults(func=_cmd_explain)

    replay = commands.add_parser(
        "replay",
        help="re-decide every request a verified ledger recorded under these policies; report what changes",
        description="Verify the ledger with --verifier-key, then re-decide each recorded issuance, denial and "
        "held request under the policy set in --policies, and report per rule what would change (allow → deny, "
        "deny → allow, review added), with example entries. Exit status: 0 done (changes within --max-changes), "
        "5 more changes than --max-changes, 1 the ledger does not verify, 2 usage or a refused policy set, 3 a "
        "rollback or fork, 4 the ledger cannot be read.",
    )
    replay.add_argument("--ledger", required=True, metavar="URL|BUNDLE",
                        help="a running broker (http(s)://...) or a bundle from `nhi-broker ledger export`")
    replay.add_argument("--verifier-key", required=True, action="append",
                        help="the ledger's verifier key, obtained out of band (repeat to trust several)")
    replay.add_argument("--since", metavar="TIME", help="only requests at or after this UTC time (RFC 3339 or a date)")
    replay.add_argument("--until", metavar="TIME", help="only requests before this UTC time (RFC 3339 or a date)")
    replay.add_argument("--max-changes", type=int, metavar="N",
                        help="exit 5 when more than N recorded requests would be decided differently")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    add_dir(replay)
    replay.set_defaults(func=_cmd_replay)

    lint = commands.add_parser("lint", help="load and validate the policy directory; print its version")
    add_dir(lint)
    lint.set_defaults(func=_cmd_lint)
