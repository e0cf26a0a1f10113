"""Load a policy directory, fail closed: any problem refuses the whole set.

A policy directory holds::

    model.conf      the Casbin model (must equal SUPPORTED_MODEL, see below)
    policy.csv      'p' rules and 'g' role inheritance lines
    workloads.toml  the workload registry
    tests.toml      policy test cases for ``nhi-broker policy test`` (optional for serving)
    limits.toml     uses, rates and value budgets of allow rules, by rule id (optional)
    approvals.toml  approval terms of review rules, by rule id (required when a rule says review)

The policy version is ``sha256:`` + the hex SHA-256 over the files present, sorted by name, each
contributing ``name || 0x00 || bytes || 0x00``. Every decision records it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from casbin.model import Model

from broker.errors import PolicyLoadError
from broker.models import ReviewTerms

from ._rules import ANY_WORKLOAD, ParsedPolicy, parse_policy_lines
from .engine import _CASBIN_SILENT, PolicySet, _LoadedPolicy
from .limits import RuleLimits, parse_limits
from .registry import WorkloadRegistry, parse_registry
from .reviews import parse_reviews

__all__ = [
    "MAX_ROLE_DEPTH", "POLICY_FILES", "SUPPORTED_MODEL", "directory_version", "load_policies", "policy_version",
]

POLICY_FILES = ("model.conf", "policy.csv", "workloads.toml", "tests.toml", "limits.toml", "approvals.toml")
_REQUIRED = ("model.conf", "policy.csv", "workloads.toml")
MAX_FILE_BYTES = 8 * 1024 * 1024
# Casbin's role manager silently stops following links after 10 hops; stay well inside that.
MAX_ROLE_DEPTH = 7

# The one model the engine implements. Indexing, deny-wins reporting and the anchored matchers all
# depend on it, so a model.conf that differs (a looser matcher, another effect) is refused rather
# than half-honoured.
SUPPORTED_MODEL = """\
[request_definition]
r = sub, aud, act, obj, ctx

[policy_definition]
p = sub, aud, act, obj, cond, eft, id, ttl, kind

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))

[matchers]
m = g(r.sub, p.sub) && audienceMatch(r.aud, p.aud) && actionMatch(r.act, p.act) \
&& resourceMatch(r.obj, p.obj, r.ctx) && conditionMatch(r.ctx, p.cond)
"""

_SPACE = re.compile(r"\s+")


def policy_version(files: Iterable[tuple[str, bytes]]) -> str:
    """``sha256:<hex>`` over ``name || NUL || bytes || NUL`` of each file, sorted by name."""
    digest = hashlib.sha256()
    for name, data in sorted(files):
        digest.update(name.encode("utf-8") + b"\x00" + data + b"\x00")
    return "sha256:" + digest.hexdigest()


def directory_version(directory: Path) -> str:
    """The version the files now in ``directory`` would load as, without interpreting them (cheap:
    read and hash). A worker compares it with a version another process loaded before loading itself."""
    files = [(name, (Path(directory) / name).read_bytes())
             for name in POLICY_FILES if (Path(directory) / name).is_file()]
    return policy_version(files)


def _model_sections(text: str) -> dict[tuple[str, str], str]:
    model = Model()
    model.logger = _CASBIN_SILENT
    model.load_model_from_text(text)
    return {
        (sec, key): _SPACE.sub("", assertion.value)
        for sec in ("r", "p", "g", "e", "m")
        if sec in model.keys()
        for key, assertion in model[sec].items()
    }


_SUPPORTED_SECTIONS = _model_sections(SUPPORTED_MODEL)
_SECTION_NAMES = {
    "r": "request_definition",
    "p": "policy_definition",
    "g": "role_definition",
    "e": "policy_effect",
    "m": "matchers",
}


def check_model(text: str, filename: str = "model.conf") -> list[str]:
    """Problems with ``model.conf``: it must define exactly :data:`SUPPORTED_MODEL`."""
    try:
        sections = _model_sections(text)
    except Exception as exc:  # Casbin's config parser raises a variety of errors
        return [f"{filename}: not a Casbin model ({type(exc).__name__}: {exc})"]
    problems = []
    for sec, key in sorted(set(sections) | set(_SUPPORTED_SECTIONS)):
        got, want = sections.get((sec, key)), _SUPPORTED_SECTIONS.get((sec, key))
        if got != want:
            what = f"[{_SECTION_NAMES[sec]}] {key}"
            if want is None:
                problems.append(f"{filename}: {what} is not supported by the broker")
            elif got is None:
                problems.append(f"{filename}: {what} is missing")
            else:
                problems.append(
                    f"{filename}: {what} differs from the supported model (see broker.policy.SUPPORTED_MODEL)"
                )
    return problems


def _read_files(directory: Path) -> tuple[dict[str, bytes], list[str]]:
    files: dict[str, bytes] = {}
    problems: list[str] = []
    if not directory.is_dir():
        return files, [f"{directory}: not a policy directory"]
    for name in POLICY_FILES:
        path = directory / name
        if not path.is_file():
            if name in _REQUIRED:
                problems.append(f"{name}: missing")
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{name}: larger than {MAX_FILE_BYTES} bytes")
            continue
        files[name] = path.read_bytes()
    return files, problems


def _decode(files: dict[str, bytes], name: str, problems: list[str]) -> str | None:
    try:
        return files[name].decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{name}: not UTF-8 (byte {exc.start})")
        return None


def _role_closure(
    registry: WorkloadRegistry, parsed: ParsedPolicy, problems: list[str]
) -> dict[str, frozenset[str]]:
    """Cross-file checks on names, and each workload's subjects: its name, roles (transitively), ``*``."""
    workloads = {entry.name for entry in registry}
    assigned = {role for entry in registry for role in entry.roles}
    parents: dict[str, set[str]] = {}
    seen_links: dict[tuple[str, str], str] = {}
    for entry in registry:
        for role in entry.roles:
            if role in workloads:
                problems.append(f"{entry.source}: role {role!r} is also a workload name")
    for role, parent, where in parsed.links:
        if (role, parent) in seen_links:
            problems.append(f"{where}: role link {role} -> {parent} repeats {seen_links[(role, parent)]}")
            continue
        seen_links[(role, parent)] = where
        parents.setdefault(role, set()).add(parent)
    inherited = {parent for ps in parents.values() for parent in ps}
    known_roles = assigned | inherited
    for (role, parent), where in seen_links.items():
        for name in (role, parent):
            if name in workloads:
                problems.append(
                    f"{where}: {name!r} is a workload; 'g' lines link roles "
                    "(workloads get their roles in workloads.toml)"
                )
        if role not in known_roles:
            problems.append(
                f"{where}: unknown role {role!r}: no workload has it and no role inherits from it"
            )

    def depth(role: str, trail: tuple[str, ...]) -> int:
        if role in trail:
            raise ValueError(" -> ".join((*trail[trail.index(role) :], role)))
        return 1 + max((depth(p, (*trail, role)) for p in parents.get(role, ())), default=0)

    for role in sorted(parents):
        try:
            if depth(role, ()) - 1 > MAX_ROLE_DEPTH:
                problems.append(
                    f"policy.csv: role {role!r} inherits through more than {MAX_ROLE_DEPTH} levels"
                )
        except ValueError as cycle:
            problems.append(f"policy.csv: role inheritance cycle {cycle}")
            return {}

    for rule in parsed.rules:
        subject = rule.subject
        if subject != ANY_WORKLOAD and subject not in known_roles and subject not in workloads:
            problems.append(
                f"{rule.source}: unknown role {subject!r} in rule {rule.rule_id!r}: "
                "not a role of any workload, an inherited role, or a workload name"
            )

    closure: dict[str, frozenset[str]] = {}
    for entry in registry:
        subjects = {entry.name, ANY_WORKLOAD}
        pending = list(entry.roles)
        while pending:
            role = pending.pop()
            if role not in subjects:
                subjects.add(role)
                pending.extend(parents.get(role, ()))
        closure[entry.name] = frozenset(subjects)
    return closure


def load_policies(directory: Path) -> PolicySet:
    """Load and validate a policy directory; raise :class:`PolicyLoadError` listing every problem.

    Nothing is partially loaded: a single bad line refuses the whole set. An empty rule set loads
    and denies everything.
    """
    directory = Path(directory)
    # (1) read the files and fix the version before anything interprets them.
    files, problems = _read_files(directory)
    if problems:
        raise PolicyLoadError(problems)
    version = policy_version(files.items())
    model_text = _decode(files, "model.conf", problems)
    policy_text = _decode(files, "policy.csv", problems)
    registry_text = _decode(files, "workloads.toml", problems)
    if model_text is None or policy_text is None or registry_text is None:
        raise PolicyLoadError(problems)
    # (2) the model must be the one the engine implements.
    problems.extend(check_model(model_text))
    # (3) the registry, (4) the policy lines, (5) names that cross the two files.
    registry, registry_problems = parse_registry(registry_text)
    problems.extend(registry_problems)
    parsed, line_problems = parse_policy_lines(policy_text)
    problems.extend(line_problems)
    subjects: dict[str, frozenset[str]] = {}
    if registry is not None:
        subjects = _role_closure(registry, parsed, problems)
    limits: dict[str, RuleLimits] = {}
    if "limits.toml" in files and not problems:
        limits_text = _decode(files, "limits.toml", problems)
        if limits_text is not None:
            limits, limit_problems = parse_limits(limits_text, {r.rule_id: r for r in parsed.rules})
            problems.extend(limit_problems)
    reviews: dict[str, ReviewTerms] = {}
    if not problems:
        reviews_text = _decode(files, "approvals.toml", problems) if "approvals.toml" in files else None
        reviews, review_problems = parse_reviews(reviews_text, {r.rule_id: r for r in parsed.rules})
        problems.extend(review_problems)
    if problems:
        raise PolicyLoadError(problems)
    assert registry is not None
    # (6) build the indexed enforcers; every rule is probed once, a raising rule refuses the set.
    links = [(entry.name, role) for entry in registry for role in entry.roles]
    links += [(role, parent) for role, parent, _ in parsed.links]
    links += [(entry.name, ANY_WORKLOAD) for entry in registry]
    policy_set = PolicySet(
        _LoadedPolicy(
            version=version,
            model_text=SUPPORTED_MODEL,
            registry=registry,
            rules=tuple(parsed.rules),
            links=tuple(links),
            subjects=subjects,
        )
    )
    policy_set.limits = limits
    policy_set.reviews = reviews
    return policy_set
