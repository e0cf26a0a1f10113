"""Policy replay: re-decide every request a verified ledger recorded under a candidate policy set.

The input is evidence, not a log file: :func:`replay_ledger` verifies the whole ledger
(:func:`broker.audit.verify_ledger`, with the auditor's key) and replays each entry as that
verification reads and validates it; the report is returned only if the ledger then verifies
(signed root, every entry). Each recorded request is decided again, exactly as the broker
decides (registry → audience → intent policy), and compared with what the ledger says happened:

- ``issuance`` without ``approval``: the recorded decision was **allow** (its rule);
- ``issuance`` with ``approval``, or a final ``approval`` entry that released nothing: **review**;
- ``denial`` by the policy (``access_denied``) or for the audience (``invalid_target``): **deny**.

What cannot be replayed is counted, never guessed (docs/policy-replay.md): denials decided by
something other than the intent policy (kill switch, rate limit, budget, DPoP, Vault down), and
requests from workloads the registry did not know (their entry has no workload name, so a new
registry entry could match them, but their evidence's attestation details are all that is kept),
and delegated requests under rules that read user claims the entry does not keep (it records the
user's issuer and subject only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.audit.source import LedgerSource
from broker.audit.verify import VerifierKeys, verify_ledger
from broker.errors import InvalidTarget, UnregisteredWorkload
from broker.models import EndUser, Intent, RegisteredWorkload, WorkloadIdentity
from broker.policy._rules import Rule
from broker.policy.engine import PolicySet

__all__ = ["Change", "ReplayReport", "RuleChanges", "replay_entries", "replay_ledger"]

POLICY_ERRORS = frozenset({"access_denied", "invalid_target"})
EXAMPLES_PER_TRANSITION = 3
CONFIRM_SAMPLE = 2  # of 256: about 0.8% of distinct requests are also decided by Casbin itself
#: The user terms a ledger entry's ``user`` member gives back (issuer and subject); ``user.delegated``
#: is whether the member is there. Mapped claims (``user.tenant``) are not recorded.
RECORDED_USER_TERMS = frozenset({"user.sub", "user.iss", "user.delegated"})


@dataclass(frozen=True, slots=True)
class Change:
    """One recorded request whose decision differs under the candidate policies."""

    index: int
    leaf_hash: str
    time: str
    workload: str
    audience: str
    action: str
    resource: str
    before: str  # allow | deny | review
    before_rule: str | None
    after: str
    after_rule: str | None
    reason: str

    @property
    def transition(self) -> str:
        """``allow → deny``, ``deny → allow``, ``allow → review`` (review added), ..."""
        return f"{self.before} → {self.after}"


@dataclass
class RuleChanges:
    """The changes one rule accounts for: counts per transition and a few example entries each."""

    rule: str
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[Change]] = field(default_factory=dict)

    def add(self, change: Change) -> None:
        self.counts[change.transition] += 1
        examples = self.examples.setdefault(change.transition, [])
        if len(examples) < EXAMPLES_PER_TRANSITION:
            examples.append(change)

    @property
    def total(self) -> int:
        """How many recorded requests this rule's change affects."""
        return sum(self.counts.values())


@dataclass
class ReplayReport:
    """What the candidate policies would have changed. Built by :func:`replay_ledger`."""

    candidate_version: str
    checkpoint_size: int = 0
    verified_root: str = ""
    replayed: int = 0
    unchanged: int = 0
    not_replayable: Counter[str] = field(default_factory=Counter)
    by_rule: dict[str, RuleChanges] = field(default_factory=dict)
    transitions: Counter[str] = field(default_factory=Counter)
    recorded_versions: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        """Recorded requests decided differently under the candidate policies."""
        return sum(self.transitions.values())

    def add(self, change: Change) -> None:
        # A change is the candidate's doing: charge it to the rule that now decides, or, when the
        # request now falls to the default deny, to the rule that used to decide it.
        rule = change.after_rule or (f"{change.before_rule} (no longer matches)" if change.before_rule
                                     else "(default deny)")
        self.by_rule.setdefault(rule, RuleChanges(rule)).add(change)
        self.transitions[change.transition] += 1

    def lines(self) -> list[str]:
        """The human report, rules with the most changes first."""
        out = [
            f"replayed {self.replayed} recorded requests of a verified ledger of {self.checkpoint_size} entries "
            f"(root {self.verified_root})",
            f"candidate policy {self.candidate_version}; recorded under "
            + ", ".join(f"{v[:19]}… ({n})" for v, n in self.recorded_versions.most_common()),
            f"unchanged {self.unchanged}, changed {self.changed}"
            + "".join(f"; {t} {n}" for t, n in sorted(self.transitions.items())),
        ]
        if self.not_replayable:
            out.append("not replayable: " + ", ".join(f"{why} {n}" for why, n in sorted(self.not_replayable.items())))
        for rule in sorted(self.by_rule.values(), key=lambda r: (-r.total, r.rule)):
            out.append(f"rule {rule.rule}: " + ", ".join(f"{t} {n}" for t, n in sorted(rule.counts.items())))
            for transition, examples in sorted(rule.examples.items()):
                for c in examples:
                    out.append(f"    {transition:<16} entry {c.index} {c.time} {c.workload} {c.action} on "
                               f"{c.resource} (was {c.before_rule or 'default'}; {c.reason}) leaf {c.leaf_hash[:16]}…")
        return out

    def to_json(self) -> dict[str, Any]:
        """The report as JSON (for CI gates)."""
        return {
            "candidate_version": self.candidate_version, "checkpoint_size": self.checkpoint_size,
            "root": self.verified_root, "replayed": self.replayed, "unchanged": self.unchanged,
            "changed": self.changed, "transitions": dict(self.transitions),
            "not_replayable": dict(self.not_replayable),
            "rules": {
                r.rule: {"counts": dict(r.counts), "examples": {
                    t: [{"index": c.index, "leaf_hash": c.leaf_hash, "time": c.time, "workload": c.workload,
                         "audience": c.audience, "action": c.action, "resource": c.resource,
                         "before_rule": c.before_rule, "after_rule": c.after_rule, "reason": c.reason}
                        for c in ex] for t, ex in r.examples.items()}}
                for r in self.by_rule.values()
            },
        }


def _recorded(entry: dict[str, Any]) -> tuple[str, str | None] | str:
    """``(effect, rule)`` the ledger records for this request, or why it cannot be replayed."""
    kind = entry["kind"]
    decision = entry["decision"]
    if kind == "issuance":
        return ("review" if "approval" in entry else "allow"), decision["rule"]
    if kind == "approval":
        return "review", decision["rule"]
    if decision["error"] not in POLICY_ERRORS:
        return f"refused outside the intent policy ({decision['error']})"
    if "name" not in entry["workload"]:
        return "unregistered workload"
    return "deny", decision["rule"]


def _redecide(policies: PolicySet, entry: dict[str, Any], cache: dict[tuple[Any, ...], tuple[str, str | None, str]]
              ) -> tuple[str, str | None, str]:
    workload = entry["workload"]
    intent = entry["intent"]
    # Identical requests decide identically: ledgers repeat the same few intents many times.
    user = entry.get("user")
    key = (workload["spiffe_id"], workload["attestation"], workload["issuer"], entry["audience"], intent["action"],
           intent["resource"], _frozen(intent["context"]), None if user is None else (user["iss"], user["sub"]))
    cached = cache.get(key)
    if cached is None:
        cached = cache[key] = _decide_fresh(policies, entry)
    return cached


def _frozen(context: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    # Context values are scalars or string lists (the schema says so); 1 and True stay apart.
    return tuple(sorted((k, (type(v).__name__, tuple(v) if isinstance(v, list) else v)) for k, v in context.items()))


def _decide_fresh(policies: PolicySet, entry: dict[str, Any]) -> tuple[str, str | None, str]:
    workload = entry["workload"]
    intent = entry["intent"]
    identity = WorkloadIdentity(
        spiffe_id=workload["spiffe_id"], issuer=workload["issuer"], method=workload["attestation"],
        subject=workload["spiffe_id"], evidence_digest=workload["evidence_digest"], expires_at=0,
    )
    try:
        registered = _resolve(policies, identity)
    except UnregisteredWorkload as exc:
        return "deny", None, exc.description
    if entry["audience"] not in registered.audiences:
        return "deny", None, str(InvalidTarget(f"audience {entry['audience']!r} is not registered").description)
    request = Intent(intent["action"], intent["resource"], dict(intent["context"]))
    recorded_user = entry.get("user")
    user = None if recorded_user is None else EndUser(issuer=recorded_user["iss"], subject=recorded_user["sub"])
    decision = policies.decide(registered, entry["audience"], request, user)
    if _confirm(entry) and not policies.agrees_with_casbin(registered, entry["audience"], request, decision, user):
        # Casbin is the reference; a deterministic sample of the engine's decisions is put to it.
        effect, rule = policies.casbin_decision(registered, entry["audience"], request, user)
        return effect, rule, f"Casbin decides {effect} by {rule or 'default'} (the engine differed: {decision.reason})"
    return decision.effect, decision.rule_id, decision.reason


_RESOLVED: dict[tuple[str, str, str, str], RegisteredWorkload | UnregisteredWorkload] = {}


def _resolve(policies: PolicySet, identity: WorkloadIdentity) -> RegisteredWorkload:
    """The registry entry for an identity, once per (policy set, SPIFFE ID, method, issuer)."""
    key = (policies.version, identity.spiffe_id, identity.method, identity.issuer)
    found = _RESOLVED.get(key)
    if found is None:
        try:
            found = policies.resolve_workload(identity)
        except UnregisteredWorkload as exc:
            found = exc
        if len(_RESOLVED) > 65_536:
            _RESOLVED.clear()
        _RESOLVED[key] = found
    if isinstance(found, UnregisteredWorkload):
        raise found
    return found


def unrecorded_user_terms(rules: Iterable[Rule]) -> set[str]:
    """The ``user.*`` terms ``rules`` read that a ledger entry does not record (mapped claims)."""
    terms: set[str] = set()
    for rule in rules:
        for clause in rule.condition.clauses:
            terms.update(t for t in (clause.key, clause.ref) if t is not None and t.startswith("user."))
    return terms - RECORDED_USER_TERMS


def _confirm(entry: dict[str, Any]) -> bool:
    return int(entry["workload"]["evidence_digest"][-2:], 16) < CONFIRM_SAMPLE


class _Replayer:
    """Replays one verified entry at a time into a report."""

    def __init__(self, policies: PolicySet, report: ReplayReport, since: str | None, until: str | None) -> None:
        self.policies, self.report, self.since, self.until = policies, report, since, until
        self.cache: dict[tuple[Any, ...], tuple[str, str | None, str]] = {}
        self.unrecorded: dict[str, str] = {}  # action -> the user terms its rules read that entries lack

    def __call__(self, index: int, digest: bytes, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        if kind not in ("issuance", "denial", "approval"):
            return
        if kind == "approval" and (not entry["approval"]["final"] or entry["approval"]["outcome"] == "approved"):
            return  # one request, one replay: a released request is replayed as its issuance
        time = entry["time"]
        if (self.since is not None and time < self.since) or (self.until is not None and time >= self.until):
            return
        report = self.report
        recorded = _recorded(entry)
        if isinstance(recorded, str):
            report.not_replayable[recorded] += 1
            return
        if "user" in entry:
            action = entry["intent"]["action"]
            unrecorded = self.unrecorded.get(action)
            if unrecorded is None:
                unrecorded = self.unrecorded[action] = ", ".join(sorted(unrecorded_user_terms(
                    self.policies.rules_for(action))))
            if unrecorded:
                # A delegated request under rules that read user claims the entry does not keep.
                report.not_replayable[f"delegated request under rules naming {unrecorded}"] += 1
                return
        before, before_rule = recorded
        report.replayed += 1
        report.recorded_versions[entry["decision"]["policy_version"]] += 1
        after, after_rule, reason = _redecide(self.policies, entry, self.cache)
        if after == before:
            report.unchanged += 1
            return
        intent, workload = entry["intent"], entry["workload"]
        report.add(Change(
            index=index, leaf_hash=digest.hex(), time=time, workload=workload.get("name", workload["spiffe_id"]),
            audience=entry["audience"], action=intent["action"], resource=intent["resource"],
            before=before, before_rule=before_rule, after=after, after_rule=after_rule, reason=reason,
        ))


def replay_entries(
    policies: PolicySet,
    entries: Iterator[tuple[int, bytes, dict[str, Any]]],
    report: ReplayReport,
    *,
    since: str | None = None,
    until: str | None = None,
) -> ReplayReport:
    """Replay ``(index, leaf hash, entry)`` of verified entries into ``report``."""
    replay = _Replayer(policies, report, since, until)
    for index, digest, entry in entries:
        replay(index, digest, entry)
    return report


def replay_ledger(
    source: LedgerSource,
    verifier_key: VerifierKeys,
    policies: PolicySet,
    *,
    since: str | None = None,
    until: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Verify ``source`` with the auditor's key, and replay its recorded requests under ``policies``.

    Raises :class:`~broker.audit.errors.AuditFailure` (or a consistency violation) when the ledger
    does not verify: a replay over unverified entries would be no evidence at all.
    """
    import base64

    report = ReplayReport(candidate_version=policies.version)
    # One pass: each entry is replayed as verification reads it; the report is returned only if
    # the whole ledger then verifies (otherwise verify_ledger raises and the report is dropped).
    verified = verify_ledger(source, verifier_key, progress=progress,
                             on_entry=_Replayer(policies, report, since, until))
    report.checkpoint_size = verified.checkpoint.size
    report.verified_root = base64.b64encode(verified.checkpoint.root).decode()
    return report
