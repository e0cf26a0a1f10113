"""The intent-policy engine: Casbin semantics, indexed by action, deny wins, fail closed.

Casbin's ``enforce()`` walks every policy row (about 30 ms at 10,000 rows). We keep its model and
its decision, but give it fewer rows: one Casbin ``Enforcer`` per *action bucket*. A request for
action ``a.b`` can only be matched by rows whose action pattern is ``a.b``, ``a.*`` or ``*``, so its
bucket holds exactly those rows. An action that no rule names exactly falls back to the ``a.*`` +
``*`` bucket, or to the ``*`` bucket, or to nothing (default deny). All buckets share one role
manager (workload -> role from the registry, role -> role from ``g`` lines, workload -> ``*``).

Inside a bucket the rows are ordered so that Casbin's ``enforce_ex`` explanation names the rule we
report: deny rows first in file order (Casbin stops at the first matching deny), then allow rows
from the largest TTL to the smallest (Casbin reports the *last* matching allow).

Which rule decides:

1. if any deny rule matches, the decision is deny and the first matching deny rule in file order
   is reported;
2. else if ``review`` rules match, the decision is review (hold for human approval, see
   :mod:`broker.approvals`) by the one with the smallest TTL: a review rule is an allow to Casbin,
   and the stricter of the two outcomes wins over a plain allow;
3. else if allow rules match, the decision is allow by the one with the **smallest TTL** (the most
   restrictive cap; ties go to the smallest rule id);
4. else deny by default, with no rule.

On the request path the bucket's matcher is evaluated directly: the same match functions Casbin
calls, over the same rows, once per request, without pycasbin's expression evaluator or its lock.
Casbin stays the reference: every bucket enforcer is built and probed at load time,
:meth:`PolicySet.casbin_decision` answers with Casbin itself, ``policy test`` and ``policy explain``
report any disagreement, and a differential test over generated policies holds the two equal. Any
exception while deciding is a deny.
"""

from __future__ import annotations

import ast
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import casbin
from casbin.model import Model
from casbin.rbac.default_role_manager import RoleManager
from casbin.util.expression import SimpleEval

from broker.errors import InvalidTarget, PolicyDenied, PolicyLoadError, UnregisteredWorkload
from broker.intent import is_valid_action, is_valid_resource
from broker.models import EndUser, Grant, Intent, RegisteredWorkload, ReviewTerms, WorkloadIdentity

from ._patterns import audience_matches
from ._rules import BINDINGS, Rule
from .limits import RuleLimits
from .registry import WorkloadRegistry

__all__ = ["Decision", "Explanation", "PartResult", "PolicySet", "RuleTrace", "plain_enforcer", "policy_context"]

log = logging.getLogger("broker.policy")

# Casbin logs every denied request, context included, at WARNING through "casbin.enforcer"; pycasbin
# disables that logger, but a later logging.config.dictConfig(disable_existing_loggers=False) (as
# uvicorn does) turns it back on. Our enforcers get a logger outside the logging registry that no
# configuration can enable, so request data never reaches a log through Casbin.
_CASBIN_SILENT = logging.Logger("broker.policy.casbin")
_CASBIN_SILENT.disabled = True

# Casbin re-parses the matcher with ast.parse() on every enforce(). On CPython 3.11 the AST
# constructor's recursion-depth counter is shared by all threads, and concurrent parses fail at
# random with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905); the
# broker may decide in worker threads (a JWKS fetch, a remote state store, the CLI's probes).
# Such a failure would be a (spurious) deny, so serialise our
# Casbin calls: process-wide, since a reload probes a new set while the old one serves. Casbin's
# evaluation is pure Python under the GIL, so the lock costs no throughput.
_CASBIN_LOCK = threading.Lock()

class _ParsedMatcherEnforcer(casbin.Enforcer):  # type: ignore[misc]  # casbin ships no types
    """A Casbin enforcer that parses each matcher expression once, not on every ``enforce()``.

    pycasbin turns the matcher text into Python syntax and ``ast.parse``-s it on every call, about a
    tenth of an exchange's CPU. The text and the functions are fixed for the enforcer's lifetime
    (a policy reload builds new enforcers), so the parsed tree is kept; evaluation is unchanged.
    """

    def __init__(self, model: Model) -> None:
        super().__init__(model)
        self._parsed: dict[str, ast.expr] = {}

    def _get_expression(self, expr: str, functions: Any = None) -> SimpleEval:
        evaluator = SimpleEval("", functions)
        parsed = self._parsed.get(expr)
        if parsed is None:
            parsed = super()._get_expression(expr, functions).ast_parsed_value
            self._parsed[expr] = parsed
        evaluator.expr = expr
        evaluator.ast_parsed_value = parsed
        return evaluator


_RULE_ID_COLUMN = 6  # index of ``id`` in ``p = sub, aud, act, obj, cond, eft, id, ttl, kind``


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of the intent policy for one request.

    ``rule_id`` is the deciding rule, ``None`` for a default deny. ``max_ttl`` and
    ``credential_kind`` are set on allow and review only. ``reason`` names the rule id, never the rule
    text. ``review`` holds the approval terms of a review decision.
    """

    effect: Literal["allow", "deny", "review"]
    rule_id: str | None
    max_ttl: int | None
    credential_kind: str | None
    policy_version: str
    reason: str
    binding: str = "optional"  # set on allow: the strictest binding of the matching allow rules
    review: ReviewTerms | None = None

    @property
    def allowed(self) -> bool:
        """True when the intent may be issued, at once (allow) or once approved (review)."""
        return self.effect in ("allow", "review")


@dataclass(frozen=True, slots=True)
class PartResult:
    """One part of a rule's match: ``subject``, ``audience``, ``action``, ``resource`` or a clause
    of the condition (``condition``)."""

    part: str
    matched: bool
    detail: str


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """How one candidate rule fared against the request."""

    rule_id: str
    effect: str
    source: str
    ttl: int | None
    kind: str | None
    parts: tuple[PartResult, ...]

    @property
    def matched(self) -> bool:
        return all(p.matched for p in self.parts)


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every candidate rule for a request, which part of each matched or failed, and the decision."""

    workload: RegisteredWorkload
    audience: str
    intent: Intent
    candidates: tuple[RuleTrace, ...]
    decision: Decision
    user: EndUser | None = None
    #: Casbin's own answer for the same request, ``(effect, rule id)`` (the reference).
    casbin: tuple[str, str | None] = ("deny", None)

    @property
    def agrees_with_casbin(self) -> bool:
        """Whether the decision is Casbin's (a review is an allow to Casbin)."""
        return self.casbin == ("allow" if self.decision.allowed else "deny", self.decision.rule_id)

    def to_json(self) -> dict[str, Any]:
        """The report as ``nhi-broker policy explain --format json`` prints it."""
        d = self.decision
        return {
            "workload": {"name": self.workload.name, "spiffe_id": self.workload.spiffe_id,
                         "owner": self.workload.owner},
            "audience": self.audience,
            "intent": {"action": self.intent.action, "resource": self.intent.resource,
                       "context": json.loads(json.dumps(self.intent.context, default=repr))},
            "user": None if self.user is None else {"iss": self.user.issuer, "sub": self.user.subject,
                                                    "claims": dict(self.user.claims)},
            "policy_version": d.policy_version,
            "candidates": [
                {"rule_id": t.rule_id, "effect": t.effect, "source": t.source, "ttl": t.ttl, "kind": t.kind,
                 "matched": t.matched, "parts": [{"part": p.part, "matched": p.matched, "detail": p.detail}
                                                 for p in t.parts]}
                for t in self.candidates
            ],
            "decision": {
                "effect": d.effect, "rule_id": d.rule_id, "reason": d.reason, "max_ttl": d.max_ttl,
                "credential_kind": d.credential_kind, "binding": d.binding,
                "review": None if d.review is None else {
                    "rule_id": d.review.rule_id, "approvers": d.review.approvers, "approvals": d.review.approvals,
                    "max_wait": d.review.max_wait, "owner_may_approve": d.review.owner_may_approve},
            },
        }

    def render(self) -> str:
        """A plain-text report for ``nhi-broker policy explain``."""
        intent = self.intent
        lines = [
            f"workload  {self.workload.name} ({self.workload.spiffe_id})",
            f"owner     {self.workload.owner}",
            f"audience  {self.audience}",
            f"action    {intent.action}",
            f"resource  {intent.resource}",
            f"context   {json.dumps(intent.context, sort_keys=True, default=repr)}",
        ]
        if self.user is None:
            lines.append("user      (none: not a delegated request; every user.* term is missing)")
        else:
            user_terms = self.user.policy_terms()
            lines.append("user      " + ", ".join(f"{k} = {user_terms[k]!r}" for k in sorted(user_terms)))
        lines += [f"policy    {self.decision.policy_version}", ""]
        if not self.candidates:
            lines.append("no rule names this action (or a pattern covering it)")
        else:
            lines.append(f"candidate rules ({len(self.candidates)}, file order):")
        for trace in self.candidates:
            mark = "MATCH" if trace.matched else "no   "
            cap = "" if trace.effect == "deny" else f" ttl={trace.ttl}s kind={trace.kind}"
            lines.append(f"  {mark} {trace.rule_id} [{trace.effect}{cap}] {trace.source}")
            for part in trace.parts:
                status = "ok  " if part.matched else "FAIL"
                lines.append(f"        {status} {part.part:<10} {part.detail}")
        lines += ["", f"decision  {self.decision.effect.upper()}: {self.decision.reason}"]
        if self.decision.review is not None:
            terms = self.decision.review
            lines.append(
                f"          held for {terms.approvals} approval(s) by group {terms.approvers}, "
                f"waiting at most {terms.max_wait}s"
                + ("" if not terms.owner_may_approve else "; the owner may approve alone")
            )
        if self.decision.allowed:
            lines.append(
                f"          max ttl {self.decision.max_ttl}s, credential {self.decision.credential_kind}"
                + ("" if self.decision.binding == "optional" else f", binding {self.decision.binding}")
            )
        effect, rule_id = self.casbin
        said = f"{effect} by rule {rule_id}" if rule_id else f"{effect}, no rule"
        lines.append(f"casbin    {said}" + ("" if self.agrees_with_casbin else
                                             "  -- DISAGREES with the decision above: report this as a bug"))
        return "\n".join(lines)


@dataclass(frozen=True)
class _LoadedPolicy:
    """Everything :func:`broker.policy.load_policies` validated; the only input to :class:`PolicySet`."""

    version: str
    model_text: str
    registry: WorkloadRegistry
    rules: tuple[Rule, ...]
    links: tuple[tuple[str, str], ...]
    subjects: Mapping[str, frozenset[str]]


@dataclass(frozen=True)
class _Bucket:
    name: str
    rules: tuple[Rule, ...]  # in Casbin order
    enforcer: casbin.Enforcer


def _casbin_order(rules: list[Rule], file_order: Mapping[str, int]) -> tuple[Rule, ...]:
    # Casbin stops at the first matching deny: keep denies in file order, as plain Casbin sees them.
    denies = sorted((r for r in rules if r.effect == "deny"), key=lambda r: file_order[r.rule_id])
    # Casbin reports the last matching allow: largest TTL first, so the last match is the smallest.
    allows = sorted(
        (r for r in rules if r.effect == "allow"), key=lambda r: (r.ttl or 0, r.rule_id), reverse=True
    )
    # Review rows are allows to Casbin; last, so that Casbin's explanation names a matching review rule.
    reviews = sorted(
        (r for r in rules if r.effect == "review"), key=lambda r: (r.ttl or 0, r.rule_id), reverse=True
    )
    return (*denies, *allows, *reviews)


def _parent_action(action: str) -> str | None:
    head, dot, _ = action.rpartition(".")
    return head if dot else None


class PolicySet:
    """A loaded, validated intent-policy set. Build it with :func:`broker.policy.load_policies`.

    ``version`` is the ``sha256:`` digest of the policy files, ``registry`` the
    :class:`WorkloadRegistry` and ``rules`` every rule in file order. Immutable once built, so one
    instance can serve concurrent requests; a reload builds a new one.
    """

    def __init__(self, loaded: _LoadedPolicy) -> None:
        if not isinstance(loaded, _LoadedPolicy):
            raise TypeError("build a PolicySet with broker.policy.load_policies()")
        self.version: str = loaded.version
        self.registry: WorkloadRegistry = loaded.registry
        self.rules: tuple[Rule, ...] = loaded.rules
        #: Uses, rates and budgets by allow-rule id (``limits.toml``); set by the loader.
        self.limits: Mapping[str, RuleLimits] = {}
        #: Approval terms by review-rule id (``approvals.toml``); set by the loader.
        self.reviews: Mapping[str, ReviewTerms] = {}
        self._loaded = loaded
        self._subjects = dict(loaded.subjects)
        self._rules_by_id = {r.rule_id: r for r in loaded.rules}
        self._file_order = {r.rule_id: i for i, r in enumerate(loaded.rules)}
        self._actions = {r.action: r.action_pattern for r in loaded.rules}
        self._resources = {r.resource: r.resource_pattern for r in loaded.rules}
        self._conditions = {r.condition_text: r.condition for r in loaded.rules}

        exact: dict[str, list[Rule]] = {}
        prefix: dict[str, list[Rule]] = {}
        star: list[Rule] = []
        for rule in loaded.rules:
            pattern = rule.action_pattern
            if pattern.any:
                star.append(rule)
            elif pattern.prefix is not None:
                prefix.setdefault(pattern.prefix, []).append(rule)
            else:
                exact.setdefault(rule.action, []).append(rule)
        # One role manager serves every bucket. Each bucket enforcer is pointed at it while it is
        # still empty (build_role_links clears it); the role enforcer then fills it, once.
        self._role_manager = RoleManager(max_hierarchy_level=10)
        self._exact: dict[str, _Bucket] = {}
        self._prefix: dict[str, _Bucket] = {}
        for action, rows in exact.items():
            parent = _parent_action(action)
            extra = prefix.get(parent, []) if parent is not None else []
            self._exact[action] = self._bucket(action, [*rows, *extra, *star])
        for head, rows in prefix.items():
            self._prefix[head] = self._bucket(f"{head}.*", [*rows, *star])
        self._star: _Bucket | None = self._bucket("*", star) if star else None
        self._roles = self._new_enforcer((), self._role_manager)
        links = [list(link) for link in loaded.links]
        if links and not self._roles.add_grouping_policies(links):
            raise RuntimeError("Casbin refused the role links")
        self._probe()

    # -- construction ---------------------------------------------------------------------------

    def _functions(self) -> dict[str, Any]:
        actions, resources, conditions = self._actions, self._resources, self._conditions

        def action_match(action: Any, pattern: str) -> bool:
            return actions[pattern].matches(action)

        def resource_match(resource: Any, pattern: str, ctx: Any) -> bool:
            return resources[pattern].matches(resource, ctx)

        def condition_match(ctx: Any, condition: str) -> bool:
            return conditions[condition].matches(ctx)

        return {
            "audienceMatch": audience_matches,
            "actionMatch": action_match,
            "resourceMatch": resource_match,
            "conditionMatch": condition_match,
        }

    def _new_enforcer(self, rules: tuple[Rule, ...], role_manager: RoleManager | None) -> casbin.Enforcer:
        """A Casbin enforcer over ``rules`` (in this order). With ``role_manager`` it uses that
        (shared) role manager; without, it gets its own, filled from the role links."""
        model = Model()
        model.logger = _CASBIN_SILENT
        model.load_model_from_text(self._loaded.model_text)
        enforcer = _ParsedMatcherEnforcer(model)
        enforcer.logger = _CASBIN_SILENT
        for name, fn in self._functions().items():
            enforcer.add_function(name, fn)
        if role_manager is not None:
            enforcer.set_role_manager(role_manager)
            enforcer.build_role_links()  # points the model's g at it
        else:
            links = [list(link) for link in self._loaded.links]
            if links and not enforcer.add_grouping_policies(links):
                raise RuntimeError("Casbin refused the role links")
        if rules and not enforcer.add_policies([r.casbin_row() for r in rules]):
            raise RuntimeError("Casbin refused the policy rows")
        return enforcer

    def _bucket(self, name: str, rules: list[Rule]) -> _Bucket:
        ordered = _casbin_order(rules, self._file_order)
        return _Bucket(name=name, rules=ordered, enforcer=self._new_enforcer(ordered, self._role_manager))

    def _probe(self) -> None:
        """Prove that no row raises: every rule is evaluated once, part by part, through the very
        functions Casbin calls, and every bucket enforcer decides one request drawn from its rows.
        A failure refuses the set."""
        problems: list[str] = []
        functions = self._functions()
        workloads = list(self._subjects)
        probes: dict[str, tuple[str, str, str, str, dict[str, Any]]] = {}
        for rule in self.rules:
            holder = next((w for w in workloads if rule.subject in self._subjects[w]), rule.subject)
            audience, action, resource, ctx = _probe_request(rule, holder)
            probes[rule.rule_id] = (holder, audience, action, resource, ctx)
            try:
                self._role_manager.has_link(holder, rule.subject)
                functions["audienceMatch"](audience, rule.audience)
                functions["actionMatch"](action, rule.action)
                functions["resourceMatch"](resource, rule.resource, ctx)
                functions["conditionMatch"](ctx, rule.condition_text)
                bucket = self._bucket_for(action)
                if bucket is None or rule not in bucket.rules:
                    raise LookupError("rule is not in the bucket of its own action")
            except Exception as exc:
                problems.append(
                    f"{rule.source}: rule {rule.rule_id!r} failed its load-time probe ({type(exc).__name__})"
                )
        buckets = [*self._exact.values(), *self._prefix.values(), *([self._star] if self._star else [])]
        for bucket in buckets:
            try:
                with _CASBIN_LOCK:
                    bucket.enforcer.enforce_ex(*probes[bucket.rules[0].rule_id])
            except Exception as exc:
                problems.append(
                    f"policy.csv: the rules for {bucket.name} failed their load-time probe "
                    f"({type(exc).__name__})"
                )
        if problems:
            raise PolicyLoadError(problems)

    # -- lookups --------------------------------------------------------------------------------

    def _bucket_for(self, action: str) -> _Bucket | None:
        bucket = self._exact.get(action)
        if bucket is not None:
            return bucket
        parent = _parent_action(action)
        if parent is not None:
            bucket = self._prefix.get(parent)
            if bucket is not None:
                return bucket
        return self._star

    def rules_for(self, action: str) -> tuple[Rule, ...]:
        """Every rule that can match a request for ``action`` (its bucket, in Casbin order)."""
        bucket = self._bucket_for(action)
        return () if bucket is None else bucket.rules

    def resolve_workload(self, identity: WorkloadIdentity) -> RegisteredWorkload:
        """The registry entry for an attested identity (exact SPIFFE ID beats a pattern).

        Raises :class:`UnregisteredWorkload` when no entry matches or the entry does not allow the
        identity's attestation method.
        """
        return self.registry.resolve(identity)

    # -- decisions ------------------------------------------------------------------------------

    def _decision(
        self, effect: Literal["allow", "deny", "review"], rule: Rule | None, reason: str, binding: str = "optional"
    ) -> Decision:
        allowed = effect in ("allow", "review") and rule is not None
        review = self.reviews.get(rule.rule_id) if effect == "review" and rule is not None else None
        if effect == "review" and review is None:
            allowed = False  # a review rule without approval terms never issues (the loader refuses it)
        return Decision(
            effect=effect if allowed else "deny",
            rule_id=rule.rule_id if rule is not None else None,
            max_ttl=rule.ttl if allowed and rule is not None else None,
            credential_kind=rule.kind if allowed and rule is not None else None,
            policy_version=self.version,
            reason=reason,
            binding=binding if allowed else "optional",
            review=review,
        )

    def _default_deny(self, intent: Intent) -> Decision:
        return self._decision("deny", None, f"no rule allows {intent.action} on {intent.resource}")

    def decide(
        self, workload: RegisteredWorkload, audience: str, intent: Intent, user: EndUser | None = None
    ) -> Decision:
        """Decide one request. Never raises: anything unexpected is a logged deny.

        Deny wins; among several matching allow rules the one with the smallest TTL decides (see
        the module docstring). ``user`` is the verified end user of a delegated exchange: conditions
        see it as ``user.sub``, ``user.iss`` and its mapped claims.
        """
        try:
            return self._decide(workload, audience, intent, user)
        except Exception as exc:
            log.error(
                "policy evaluation failed; denying (workload=%s policy=%s error=%s)",
                getattr(workload, "name", "?"),
                self.version,
                type(exc).__name__,
            )
            return self._decision("deny", None, "policy evaluation failed")

    def _decide(
        self, workload: RegisteredWorkload, audience: str, intent: Intent, user: EndUser | None
    ) -> Decision:
        # (1) only well-formed requests from workloads of this policy set reach Casbin.
        subjects = self._subjects.get(workload.name)
        if subjects is None:
            return self._decision("deny", None, f"workload {workload.name} is not in this policy set")
        if not isinstance(intent.context, dict):
            return self._decision("deny", None, "the intent is not well-formed")
        ctx = policy_context(intent, user)
        if (
            not isinstance(audience, str)
            or not is_valid_action(intent.action)
            or not is_valid_resource(intent.resource)
        ):
            return self._decision("deny", None, "the intent is not well-formed")
        # (2) the bucket of rows that can match this action.
        bucket = self._bucket_for(intent.action)
        if bucket is None:
            return self._default_deny(intent)
        # (3) the bucket's matcher, evaluated directly. Deny rows come first, in file order, so the
        # first matching deny is the one plain Casbin stops at.
        matching: list[Rule] = []
        action, resource = intent.action, intent.resource
        for rule in bucket.rules:
            if rule.matches(subjects, audience, action, resource, ctx):
                if rule.effect == "deny":
                    return self._decision("deny", rule, f"denied by rule {rule.rule_id}")
                matching.append(rule)
        if not matching:
            return self._default_deny(intent)
        # (4) review beats allow; the smallest TTL decides (ties: the smallest rule id).
        return self._allowed_by(matching)[0]

    def _allowed_by(self, matching: list[Rule]) -> tuple[Decision, Rule]:
        """Steps 2-3 of the module docstring over matching allow and review rules (none of them deny)."""
        reviews = [r for r in matching if r.effect == "review"]
        chosen = min(reviews or matching, key=lambda r: (r.ttl or 0, r.rule_id))
        # A sender constraint any matching allow rule demands holds, whichever rule caps the TTL.
        binding = max((r.binding for r in matching), key=BINDINGS.index)
        if reviews:
            return self._decision("review", chosen, f"held for review by rule {chosen.rule_id}", binding), chosen
        return self._decision("allow", chosen, f"allowed by rule {chosen.rule_id}", binding), chosen

    def casbin_decision(self, workload: RegisteredWorkload, audience: str, intent: Intent,
                        user: EndUser | None = None) -> tuple[str, str | None]:
        """Casbin's own answer for the request's bucket: ``(effect, rule id)``, effect ``allow`` or ``deny``.

        The reference the request path must agree with (``policy test`` and ``policy explain``
        compare the two; tests compare them over generated policies). Off the request path: pycasbin
        is not thread-safe, so this takes a lock.
        """
        subjects = self._subjects.get(workload.name)
        if subjects is None or not isinstance(intent.context, dict):
            return "deny", None
        ctx = policy_context(intent, user)
        if not (isinstance(audience, str) and is_valid_action(intent.action) and is_valid_resource(intent.resource)):
            return "deny", None
        bucket = self._bucket_for(intent.action)
        if bucket is None:
            return "deny", None
        with _CASBIN_LOCK:
            allowed, explain = bucket.enforcer.enforce_ex(workload.name, audience, intent.action, intent.resource, ctx)
        rule_id = explain[_RULE_ID_COLUMN] if explain else None
        if allowed:
            return "allow", rule_id
        return "deny", rule_id if rule_id is not None and self._rules_by_id[rule_id].effect == "deny" else None

    def agrees_with_casbin(self, workload: RegisteredWorkload, audience: str, intent: Intent,
                           decision: Decision, user: EndUser | None = None) -> bool:
        """Whether ``decision`` (from :meth:`decide`) is what Casbin decides: the same effect (a review
        is an allow to Casbin) and, for a deny by a rule, the same rule."""
        # Casbin reports the first matching deny, or the last matching allow in bucket order: the
        # bucket order (denies in file order, allows then reviews by falling TTL) makes that the
        # rule the engine chooses.
        return self.casbin_decision(workload, audience, intent, user) == (
            "allow" if decision.allowed else "deny", decision.rule_id)

    def authorize(
        self,
        identity: WorkloadIdentity,
        workload: RegisteredWorkload,
        audience: str,
        intent: Intent,
        user: EndUser | None = None,
    ) -> Grant:
        """The :class:`Grant` for an allowed request, or the error the broker answers with.

        A request a ``review`` rule decides gets a Grant whose ``review`` names the approval terms:
        the broker must hold it until people approve it (:mod:`broker.approvals`).

        Raises :class:`UnregisteredWorkload` if ``workload`` is not this set's entry for
        ``identity``, :class:`InvalidTarget` if ``audience`` is not one of the workload's audiences,
        and :class:`PolicyDenied` (carrying the rule id and policy version) on deny.
        """
        # (1) the workload must be what this policy set resolves the identity to (a reload may
        # have changed the registry since it was resolved).
        if self.resolve_workload(identity) != workload:
            raise UnregisteredWorkload(
                f"workload {identity.spiffe_id} does not match its registry entry in policy {self.version}"
            )
        # (2) the audience must be registered for the workload.
        if audience not in workload.audiences:
            raise InvalidTarget(
                f"audience {str(audience)[:128]!r} is not registered for workload {workload.name}"
            )
        # (3) the intent policy.
        decision = self.decide(workload, audience, intent, user)
        if not decision.allowed:
            raise PolicyDenied(
                decision.reason, rule_id=decision.rule_id, policy_version=decision.policy_version
            )
        assert decision.rule_id is not None and decision.max_ttl is not None
        assert decision.credential_kind is not None
        return Grant(
            identity=identity,
            workload=workload,
            intent=intent,
            audience=audience,
            rule_id=decision.rule_id,
            max_ttl=decision.max_ttl,
            credential_kind=decision.credential_kind,
            policy_version=decision.policy_version,
            binding=decision.binding,
            review=decision.review,
            user=user,
        )

    # -- explanations ---------------------------------------------------------------------------

    def explain(
        self, workload: RegisteredWorkload, audience: str, intent: Intent, user: EndUser | None = None
    ) -> Explanation:
        """Trace every candidate rule (those whose action pattern covers the intent's action), part
        by part, next to the decision :meth:`decide` makes."""
        decision = self.decide(workload, audience, intent, user)
        bucket = self._bucket_for(intent.action) if is_valid_action(intent.action) else None
        subjects = self._subjects.get(workload.name, frozenset())
        traces: list[RuleTrace] = []
        if bucket is not None:
            for rule in sorted(bucket.rules, key=lambda r: self._file_order[r.rule_id]):
                traces.append(self._trace(rule, workload, subjects, audience, intent, user))
        return Explanation(
            workload=workload, audience=audience, intent=intent, candidates=tuple(traces), decision=decision,
            user=user, casbin=self.casbin_decision(workload, audience, intent, user),
        )

    def _trace(
        self,
        rule: Rule,
        workload: RegisteredWorkload,
        subjects: frozenset[str],
        audience: str,
        intent: Intent,
        user: EndUser | None = None,
    ) -> RuleTrace:
        ctx = policy_context(intent, user) if isinstance(intent.context, dict) else {}
        parts = []
        if rule.subject == "*":
            parts.append(PartResult("subject", bool(subjects), "* (every registered workload)"))
        else:
            has = rule.subject in subjects
            verb = "is" if rule.subject == workload.name else ("has role" if has else "lacks role")
            parts.append(PartResult("subject", has, f"{workload.name} {verb} {rule.subject}"))
        parts.append(
            PartResult(
                "audience", audience_matches(audience, rule.audience), f"{audience} vs {rule.audience}"
            )
        )
        parts.append(
            PartResult(
                "action", rule.action_pattern.matches(intent.action), f"{intent.action} vs {rule.action}"
            )
        )
        why = rule.resource_pattern.explain(intent.resource, ctx)
        parts.append(
            PartResult(
                "resource", why is None, f"{intent.resource} vs {rule.resource}" + (f": {why}" if why else "")
            )
        )
        if not rule.condition.clauses:
            parts.append(PartResult("condition", True, "(none)"))
        for clause in rule.condition.clauses:
            parts.append(PartResult("condition", clause.evaluate(ctx), clause.describe(ctx)))
        return RuleTrace(
            rule_id=rule.rule_id,
            effect=rule.effect,
            source=rule.source,
            ttl=rule.ttl,
            kind=rule.kind,
            parts=tuple(parts),
        )


def policy_context(intent: Intent, user: EndUser | None) -> dict[str, Any]:
    """What rule resources and conditions evaluate: the intent context plus the verified user's terms.

    Context keys are lower-case identifiers without dots (``broker.intent``), so the bot can never
    supply a ``user.*`` term itself. ``user.delegated`` is always there (``true`` only for a verified
    end user), so a rule can require delegation, or refuse it, in so many words.
    """
    if user is None:
        return {**intent.context, "user.delegated": False}
    return {**intent.context, **user.policy_terms(), "user.delegated": True}


def _probe_request(rule: Rule, holder: str) -> tuple[str, str, str, dict[str, Any]]:
    """A request ``(audience, action, resource, ctx)`` that reaches every part of ``rule``'s matcher."""
    audience = rule.audience if rule.audience != "*" else "probe-audience"
    pattern = rule.action_pattern
    action = pattern.exact or (f"{pattern.prefix}.probe" if pattern.prefix else "probe.action")
    ctx: dict[str, Any] = {}
    segments = []
    for seg in rule.resource_pattern.segments:
        if seg.kind == "literal":
            segments.append(seg.value)
        elif seg.kind == "ctx":
            ctx[seg.value] = "probe"
            segments.append("probe")
        else:
            segments.append("probe")
    for clause in rule.condition.clauses:
        for key in (clause.key, clause.ref):
            if key is not None and key not in ctx:
                ctx[key] = 0
    return audience, action, "/".join(segments), ctx


def plain_enforcer(policy_set: PolicySet) -> casbin.Enforcer:
    """One unindexed Casbin enforcer holding every rule in file order.

    For tests and benchmarks only (the reference the indexed engine must agree with); it is never
    on the request path.
    """
    return policy_set._new_enforcer(policy_set.rules, None)
