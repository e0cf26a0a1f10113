"""``nhi-broker admin ...``: the operators' commands against a running broker's admin API.

    admin workloads list | show NAME | suspend NAME --reason R | resume NAME --reason R
    admin revoke (--workload W | --end-user U | --conversation C) --reason R
    admin approvals list | show ID | approve ID --reason R | deny ID --reason R
    admin leases list [--workload W] [--all] | revoke TASK_ID --reason R
    admin policies reload   lint the broker's policy directory, swap it in live, record one policy_load

The broker is ``--url`` or ``$NHI_BROKER_URL`` (default http://127.0.0.1:8080); the operator's bearer
secret (or identity token) is read from ``--token-file`` or ``$NHI_BROKER_TOKEN``, never from the
command line, where other users could read it. ``--format json`` prints the broker's JSON answer as
is; ``table`` (the default) prints it for people, with times in UTC and relative to now.

Exit codes, for scripts:
    0  done
    1  the broker refused the request (bad input, already decided, a policy set that fails the lint, ...)
    2  usage error (bad arguments, no token)
    3  not found (no such workload, approval request or lease)
    4  not authenticated (401) or not allowed (403: role or group)
    5  the broker is unreachable or unavailable (connection error, 5xx)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "EXIT_AUTH",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "human_time",
    "register",
]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
DEFAULT_URL = "http://127.0.0.1:8080"
_TIMEOUT = 15.0


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def human_time(value: float | int | str | None, now: float | None = None) -> str:
    """``2026-12-03 07:10:02Z (4m ago)``; ``-`` for nothing. Accepts epoch seconds or RFC 3339 text."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value
    value = float(value)
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(value))
    delta = round(value - now)
    span = abs(delta)
    if span < 60:
        rel = f"{span}s"
    elif span < 3600:
        rel = f"{span // 60}m"
    elif span < 86400:
        rel = f"{span // 3600}h{(span % 3600) // 60:02d}m"
    else:
        rel = f"{span // 86400}d"
    return f"{stamp} ({'in ' + rel if delta > 0 else rel + ' ago'})"


def _seg(value: str) -> str:
    """One URL path segment: nothing in it can climb to another endpoint."""
    return urllib.parse.quote(value, safe="")


def _token(args: argparse.Namespace) -> str:
    token: str
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _Failure(EXIT_USAGE, f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get("NHI_BROKER_TOKEN", "").strip()
    if not token:
        raise _Failure(EXIT_USAGE, "no operator credential: set NHI_BROKER_TOKEN or pass --token-file FILE")
    return token


def _call(args: argparse.Namespace, method: str, path: str, *, body: dict[str, Any] | None = None,
          params: dict[str, str] | None = None) -> Any:
    url = (args.url or os.environ.get("NHI_BROKER_URL") or DEFAULT_URL).rstrip("/")
    headers = {"Authorization": f"Bearer {_token(args)}", "Accept": "application/json"}
    try:
        response = httpx.request(method, url + path, json=body, params=params, headers=headers, timeout=_TIMEOUT)
    except httpx.HTTPError as exc:
        raise _Failure(EXIT_UNAVAILABLE, f"cannot reach the broker at {url}: {type(exc).__name__}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code < 300 and answer is not None:
        return answer
    error = answer.get("error") if isinstance(answer, dict) else None
    description = answer.get("error_description") if isinstance(answer, dict) else None
    if error is None and isinstance(answer, dict) and "detail" in answer:  # FastAPI validation
        error, description = "invalid_request", json.dumps(answer["detail"])
    message = f"HTTP {response.status_code} {error or 'error'}: {description or response.text[:200]}"
    problems = answer.get("problems") if isinstance(answer, dict) else None
    if isinstance(problems, list) and problems:  # a refused policy set: one line per problem, as `policy lint`
        message = f"HTTP {response.status_code} {error}: policy set refused, still serving {answer.get('serving')}"
        message += "".join(f"\n  {problem}" for problem in problems)
    status = response.status_code
    code = (EXIT_AUTH if status in (401, 403) else EXIT_NOT_FOUND if status == 404
            else EXIT_UNAVAILABLE if status >= 500 else EXIT_REFUSED)
    raise _Failure(code, message)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in pairs)


def _receipt(answer: dict[str, Any]) -> str:
    receipt = answer.get("receipt") or {}
    return f"ledger entry {receipt.get('index')} ({receipt.get('leaf_hash')})" if receipt else "-"


# -- rendering ---------------------------------------------------------------------------------------


def _show_workloads(answer: dict[str, Any]) -> str:
    rows = [[w["workload"], w.get("owner") or "-", "SUSPENDED" if w["suspended"] else "active",
             human_time(w.get("suspended_since")), human_time(w.get("revoked_before"))]
            for w in answer["workloads"]]
    return _table(rows, ["WORKLOAD", "OWNER", "STATE", "SUSPENDED SINCE", "TOKENS REVOKED BEFORE"])


def _show_workload(answer: dict[str, Any]) -> str:
    return _fields([("workload", answer["workload"]), ("state", "SUSPENDED" if answer["suspended"] else "active"),
                    ("suspended since", human_time(answer.get("suspended_since"))),
                    ("tokens revoked before", human_time(answer.get("revoked_before")))])


def _show_suspension(answer: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [("workload", answer["workload"]),
                                    ("state", "SUSPENDED" if answer["suspended"] else "active")]
    if "since" in answer:
        pairs.append(("since", human_time(answer["since"])))
    if "was_suspended" in answer:
        pairs.append(("was suspended", "yes" if answer["was_suspended"] else "no"))
    if "vault_leases_revoked" in answer:
        pairs.append(("vault leases revoked", answer["vault_leases_revoked"]))
    if "vault_leases_error" in answer:
        pairs.append(("vault leases", f"NOT revoked yet: {answer['vault_leases_error']}"))
    pairs.append(("recorded", _receipt(answer)))
    return _fields(pairs)


def _show_revocation(answer: dict[str, Any]) -> str:
    return _fields([("scope", answer["scope"]), ("value", answer["value"]),
                    ("tokens issued before", human_time(answer["revoked_before"])), ("recorded", _receipt(answer))])


def _intent_text(request: dict[str, Any]) -> str:
    intent = request.get("intent") or {}
    return f"{intent.get('action')} {intent.get('resource')} {json.dumps(intent.get('context', {}), sort_keys=True)}"


def _show_approvals(answer: dict[str, Any]) -> str:
    rows = [[r["auth_req_id"], r["status"], (r.get("workload") or {}).get("name") or "-",
             f"{len(r.get('approvals', []))}/{r.get('approvals_needed')}", r.get("approvers_group") or "-",
             human_time(r.get("expires_at")), _intent_text(r)]
            for r in answer["requests"]]
    return _table(rows, ["AUTH_REQ_ID", "STATUS", "WORKLOAD", "APPROVALS", "GROUP", "EXPIRES", "INTENT"])


def _show_approval(r: dict[str, Any]) -> str:
    workload = r.get("workload") or {}
    pairs: list[tuple[str, Any]] = [
        ("auth_req_id", r["auth_req_id"]), ("status", r["status"]),
        ("workload", f"{workload.get('name')} ({workload.get('spiffe_id')})"), ("owner", workload.get("owner")),
        ("audience", r.get("audience")), ("intent", _intent_text(r)), ("rule", r.get("rule")),
        ("policy version", r.get("policy_version")), ("approvers group", r.get("approvers_group")),
        ("approvals", f"{len(r.get('approvals', []))} of {r.get('approvals_needed')}"),
        ("created", human_time(r.get("created_at"))), ("expires", human_time(r.get("expires_at"))),
    ]
    for a in r.get("approvals", []):
        pairs.append(("approved by", f"{a['name']} at {human_time(a['time'])}: {a['reason']}"))
    if r.get("denial"):
        d = r["denial"]
        pairs.append(("denied by", f"{d['name']} at {human_time(d['time'])}: {d['reason']}"))
    if r.get("ledger_entry"):
        pairs.append(("ledger entry", json.dumps(r["ledger_entry"])))
    return _fields(pairs)


def _show_leases(answer: dict[str, Any]) -> str:
    if not answer.get("vault_configured"):
        return "no Vault is configured on this broker: no leases"
    rows = [[x["task_id"], x["workload"], x["kind"], x["state"], f"{x['ref_type']} {x['ref']}",
             human_time(x["issued_at"]), human_time(x["expires_at"])] for x in answer["leases"]]
    return _table(rows, ["TASK", "WORKLOAD", "KIND", "STATE", "LEASE", "ISSUED", "EXPIRES"])


def _show_lease(x: dict[str, Any]) -> str:
    return _fields([("task", x["task_id"]), ("workload", x["workload"]), ("kind", x["kind"]), ("state", x["state"]),
                    ("lease", f"{x['ref_type']} {x['ref']}"), ("issued", human_time(x["issued_at"])),
                    ("expires", human_time(x["expires_at"])), ("reason", x.get("reason") or "-"),
                    ("issuance entry", x.get("issuance") or "-")])


def _show_reload(answer: dict[str, Any]) -> str:
    if answer["changed"]:
        state = f"live now (was {answer['previous_version']})"
    else:
        state = "already live here"
    recorded = "by this reload" if answer["recorded"] else "earlier (the set was already recorded)"
    return _fields([
        ("policy set", answer["version"]), ("state", state),
        ("recorded", f"{_receipt(answer)} {recorded}"), ("generation", answer["generation"]),
        ("contents", f"{answer['rules']} rules, {answer['workloads']} workloads, {answer['test_cases']} test cases"),
    ])


# -- commands ----------------------------------------------------------------------------------------


def _action(request: Callable[[argparse.Namespace], Any], render: Callable[[Any], str]) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            answer = request(args)
        except _Failure as exc:
            print(f"nhi-broker: {exc}", file=sys.stderr)
            return exc.code
        print(json.dumps(answer, indent=2, sort_keys=True) if args.format == "json" else render(answer))
        return EXIT_OK
    return run


def _revoke_body(args: argparse.Namespace) -> dict[str, Any]:
    for scope, value in (("workload", args.workload), ("end_user", args.end_user),
                         ("conversation", args.conversation)):
        if value is not None:
            return {"scope": scope, "value": value, "reason": args.reason}
    raise _Failure(EXIT_USAGE, "name what to revoke: --workload, --end-user or --conversation")


class _IdParser(argparse.ArgumentParser):
    """Treats an unknown ``-…`` word as a positional value: ids (base64url) may start with ``-``."""

    def _parse_optional(self, arg_string: str) -> Any:
        parsed = super()._parse_optional(arg_string)
        items = parsed if isinstance(parsed, list) else [parsed] if parsed is not None else []
        if items and all(item[0] is None for item in items) and not arg_string.startswith("--"):
            return None
        return parsed


def _decide(verb: str) -> Callable[[argparse.Namespace], Any]:
    def request(args: argparse.Namespace) -> Any:
        return _call(args, "POST", f"/v1/admin/approvals/{_seg(args.auth_req_id)}/{verb}",
                     body={"reason": args.reason})
    return request


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"the broker (default: $NHI_BROKER_URL or {DEFAULT_URL})")
    p.add_argument("--token-file", type=Path, metavar="FILE",
                   help="file holding the operator credential (default: $NHI_BROKER_TOKEN)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output (default: table)")


def _reason(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", required=True, help="why (recorded in the ledger)")


def register(subparsers: Any) -> None:
    """Add ``admin ...`` to the ``nhi-broker`` subcommands."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the answer
    admin = subparsers.add_parser("admin", help="operators' commands against a running broker (see exit codes)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = admin.add_subparsers(dest="admin_group", metavar="GROUP", required=True)

    def leaf(parent: Any, name: str, help_text: str, request: Callable[[argparse.Namespace], Any],
             render: Callable[[Any], str]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        _common(p)
        p.set_defaults(func=_action(request, render))
        return p

    wl = groups.add_parser("workloads", help="list, show, suspend and resume workloads").add_subparsers(
        dest="workloads_command", metavar="COMMAND", required=True, parser_class=_IdParser)
    leaf(wl, "list", "every registered workload with its state",
         lambda a: _call(a, "GET", "/v1/admin/workloads"), _show_workloads)
    p = leaf(wl, "show", "one workload's suspension and revocation state",
             lambda a: _call(a, "GET", f"/v1/admin/workloads/{_seg(a.name)}"), _show_workload)
    p.add_argument("name", help="registry name, e.g. support-assistant")
    p = leaf(wl, "suspend", "kill switch: issue nothing more, every live token inactive, Vault leases revoked",
             lambda a: _call(a, "POST", f"/v1/admin/workloads/{_seg(a.name)}/suspend", body={"reason": a.reason}),
             _show_suspension)
    p.add_argument("name")
    _reason(p)
    p = leaf(wl, "resume", "lift a suspension (tokens from before it stay inactive)",
             lambda a: _call(a, "POST", f"/v1/admin/workloads/{_seg(a.name)}/resume", body={"reason": a.reason}),
             _show_suspension)
    p.add_argument("name")
    _reason(p)

    p = leaf(groups, "revoke", "revoke every live token of a workload, end user or conversation",
             lambda a: _call(a, "POST", "/v1/admin/revocations", body=_revoke_body(a)), _show_revocation)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--workload", metavar="NAME")
    target.add_argument("--end-user", metavar="CUSTOMER", help="the intent context's customer")
    target.add_argument("--conversation", metavar="ID")
    _reason(p)

    ap = groups.add_parser("approvals", help="list, show, approve and deny intents held for review").add_subparsers(
        dest="approvals_command", metavar="COMMAND", required=True, parser_class=_IdParser)
    leaf(ap, "list", "every live approval request, pending first",
         lambda a: _call(a, "GET", "/v1/admin/approvals"), _show_approvals)
    p = leaf(ap, "show", "one approval request",
             lambda a: _call(a, "GET", f"/v1/admin/approvals/{_seg(a.auth_req_id)}"), _show_approval)
    p.add_argument("auth_req_id")
    for verb in ("approve", "deny"):
        p = leaf(ap, verb, f"{verb} a pending request (approver role, in the rule's group)",
                 _decide(verb), _show_approval)
        p.add_argument("auth_req_id")
        _reason(p)

    ls = groups.add_parser("leases", help="Vault/OpenBao leases: list and revoke").add_subparsers(
        dest="leases_command", metavar="COMMAND", required=True, parser_class=_IdParser)
    p = leaf(ls, "list", "open leases (or --all), newest first",
             lambda a: _call(a, "GET", "/v1/admin/leases", params={
                 "state": "all" if a.all else "open", **({"workload": a.workload} if a.workload else {})}),
             _show_leases)
    p.add_argument("--workload", metavar="NAME")
    p.add_argument("--all", action="store_true", help="include revoked leases")
    p = leaf(ls, "revoke", "end one Vault task now (its lease is revoked and recorded)",
             lambda a: _call(a, "POST", f"/v1/admin/leases/{_seg(a.task_id)}/revoke", body={"reason": a.reason}),
             _show_lease)
    p.add_argument("task_id")
    _reason(p)

    pol = groups.add_parser("policies", help="reload the policy set live").add_subparsers(
        dest="policies_command", metavar="COMMAND", required=True)
    leaf(pol, "reload", "lint the broker's policy directory, swap it in on every worker, record one policy_load "
         "(a refused set: exit 1, each problem printed, the old set keeps serving)",
         lambda a: _call(a, "POST", "/v1/admin/policies/reload"), _show_reload)
