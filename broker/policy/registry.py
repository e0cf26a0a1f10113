"""The workload registry (``workloads.toml``): which attested identities are assistants we know.

Each ``[[workload]]`` names an assistant, its accountable human owner, its roles, the audiences it
may ask credentials for, and the attestation methods it may prove itself with::

    [[workload]]
    name = "support-assistant"
    spiffe_id = "spiffe://example.org/ns/support/sa/support-assistant"
    owner = "Dana Reyes <dana.reyes@example.com>"
    roles = ["support-agent", "refund-agent"]
    audiences = ["orders-api", "payments-api"]
    attestation = ["kubernetes", "spiffe-jwt", "dev"]
    delegators = ["support-assistant"]   # optional: whose task tokens it may narrow as a sub-agent

``spiffe_id`` is an exact SPIFFE ID or a pattern whose last path segment is ``*`` (exactly one
segment, e.g. ``spiffe://example.org/ns/reporting/sa/*``). An exact entry beats a pattern entry.
Two patterns can never match the same ID: ``*`` only ends a pattern and duplicates are refused.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from broker.attest.methods import REGISTRY
from broker.attest.spiffe import parse_spiffe_id
from broker.errors import UnregisteredWorkload
from broker.models import RegisteredWorkload, WorkloadIdentity

from ._patterns import is_valid_audience

__all__ = [
    "ATTESTATION_METHODS",
    "NAME_RE",
    "RegistryEntry",
    "WorkloadRegistry",
    "parse_registry",
]

#: The attestation methods a workload may list: every method registered in broker.attest.methods.
ATTESTATION_METHODS = REGISTRY.names
# Workload and role names: lower-case, start with a letter; they are Casbin subjects.
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MAX_OWNER_LEN = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUIRED_KEYS = frozenset({"name", "spiffe_id", "owner", "roles", "audiences", "attestation"})
_WORKLOAD_KEYS = _REQUIRED_KEYS | {"delegators"}
#: How many (SPIFFE ID, method) answers a registry keeps (WorkloadRegistry.resolve).
_RESOLVED_MAX = 4096
_HEADER_RE = re.compile(r"\s*\[\[\s*workload\s*\]\]\s*(?:#.*)?")


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One validated ``[[workload]]``. ``pattern_prefix`` is set for ``.../*`` entries."""

    name: str
    spiffe_id: str
    owner: str
    roles: tuple[str, ...]
    audiences: tuple[str, ...]
    attestation: frozenset[str]
    source: str  # "workloads.toml:12"
    pattern_prefix: str | None = None
    delegators: tuple[str, ...] = ()

    def registered(self, spiffe_id: str) -> RegisteredWorkload:
        return RegisteredWorkload(
            name=self.name,
            spiffe_id=spiffe_id,
            owner=self.owner,
            roles=self.roles,
            audiences=self.audiences,
            delegators=self.delegators,
        )


class WorkloadRegistry:
    """Validated registry entries, looked up by attested SPIFFE ID. Built by :func:`parse_registry`."""

    def __init__(self, entries: tuple[RegistryEntry, ...]) -> None:
        self._entries = entries
        self._by_name = {e.name: e for e in entries}
        self._exact = {e.spiffe_id: e for e in entries if e.pattern_prefix is None}
        self._patterns = {e.pattern_prefix: e for e in entries if e.pattern_prefix is not None}
        # resolve() is a pure function of (SPIFFE ID, method) over these immutable entries, asked twice
        # per exchange: its answers (a workload or the refusal) are kept, up to _RESOLVED_MAX of them.
        self._resolved: dict[tuple[str, str], RegisteredWorkload | UnregisteredWorkload] = {}

    def __iter__(self) -> Iterator[RegistryEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> RegistryEntry | None:
        """The entry named ``name``, if any."""
        return self._by_name.get(name)

    def lookup(self, spiffe_id: str) -> RegistryEntry | None:
        """The entry for ``spiffe_id``: the exact entry if there is one, else the matching pattern."""
        entry = self._exact.get(spiffe_id)
        if entry is not None:
            return entry
        prefix, slash, last = spiffe_id.rpartition("/")
        if not slash or not last or prefix.endswith("/"):
            return None
        return self._patterns.get(prefix)

    def resolve(self, identity: WorkloadIdentity) -> RegisteredWorkload:
        """The registered workload for an attested identity, or :class:`UnregisteredWorkload`.

        The identity must be a valid SPIFFE ID, match an entry, and have been attested with a
        method the entry allows.
        """
        key = (identity.spiffe_id, identity.method)
        known = self._resolved.get(key)
        if known is None:
            known = self._resolve(*key)
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()  # a flood of distinct IDs only costs the memo, never memory
            self._resolved[key] = known
        if isinstance(known, UnregisteredWorkload):
            raise UnregisteredWorkload(known.description)
        return known

    def _resolve(self, spiffe_id: str, method: str) -> RegisteredWorkload | UnregisteredWorkload:
        """:meth:`resolve`'s answer, the refusal returned rather than raised."""
        try:
            parsed = parse_spiffe_id(spiffe_id)
        except ValueError:
            return UnregisteredWorkload("workload identity is not a valid SPIFFE ID")
        entry = self.lookup(spiffe_id) if parsed.path else None
        if entry is None:
            return UnregisteredWorkload(f"workload {spiffe_id} is not registered")
        if method not in entry.attestation:
            return UnregisteredWorkload(
                f"workload {spiffe_id} may not authenticate with attestation method {method!r}"
            )
        return entry.registered(spiffe_id)


def _header_lines(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), start=1) if _HEADER_RE.fullmatch(line)]


def _string_list(value: Any) -> list[str] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return value


def _check_spiffe(value: Any, where: str, problems: list[str]) -> str | None:
    """Validate an exact ID or a ``.../*`` pattern; return the pattern prefix for patterns, else ''."""
    if not isinstance(value, str):
        problems.append(f"{where}: spiffe_id must be a string")
        return None
    is_pattern = value.endswith("/*")
    candidate = value[:-2] if is_pattern else value
    if "*" in candidate:
        problems.append(f"{where}: spiffe_id {value!r} may use '*' only as the whole last segment")
        return None
    try:
        parsed = parse_spiffe_id(candidate)
    except ValueError as exc:
        problems.append(f"{where}: spiffe_id {value!r} is not a SPIFFE ID ({exc})")
        return None
    if not is_pattern and not parsed.path:
        problems.append(f"{where}: spiffe_id {value!r} names a trust domain, not a workload")
        return None
    return candidate if is_pattern else ""


def parse_registry(text: str, filename: str = "workloads.toml") -> tuple[WorkloadRegistry | None, list[str]]:
    """Validate registry text. Returns the registry (``None`` on any problem) and every problem."""
    problems: list[str] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [f"{filename}: not valid TOML ({exc})"]
    unknown = set(data) - {"workload"}
    for key in sorted(unknown):
        problems.append(f"{filename}: unknown top-level key {key!r} (expected [[workload]] tables)")
    raw_entries = data.get("workload", [])
    if not isinstance(raw_entries, list) or not all(isinstance(e, dict) for e in raw_entries):
        return None, [*problems, f"{filename}: 'workload' must be an array of tables ([[workload]])"]
    lines = _header_lines(text)
    entries: list[RegistryEntry] = []
    seen_names: dict[str, str] = {}
    seen_ids: dict[str, str] = {}
    for index, raw in enumerate(raw_entries):
        line = lines[index] if index < len(lines) else None
        where = f"{filename}:{line}" if line else f"{filename} (workload #{index + 1})"
        entry = _parse_entry(raw, where, problems)
        if entry is None:
            continue
        if entry.name in seen_names:
            problems.append(f"{where}: workload name {entry.name!r} already used at {seen_names[entry.name]}")
            continue
        if entry.spiffe_id in seen_ids:
            problems.append(
                f"{where}: spiffe_id {entry.spiffe_id!r} already registered at {seen_ids[entry.spiffe_id]}"
            )
            continue
        seen_names[entry.name] = where
        seen_ids[entry.spiffe_id] = where
        entries.append(entry)
    if problems:
        return None, problems
    return WorkloadRegistry(tuple(entries)), []


def _parse_entry(raw: Mapping[str, Any], where: str, problems: list[str]) -> RegistryEntry | None:
    before = len(problems)
    for key in sorted(set(raw) - _WORKLOAD_KEYS):
        problems.append(f"{where}: unknown key {key!r} in [[workload]]")
    for key in sorted(_REQUIRED_KEYS - set(raw)):
        problems.append(f"{where}: [[workload]] is missing {key!r}")
    if len(problems) > before:
        return None

    name = raw["name"]
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        problems.append(f"{where}: name {name!r} must be a lower-case name ([a-z][a-z0-9_-]*, at most 64)")
    prefix = _check_spiffe(raw["spiffe_id"], where, problems)
    owner = raw["owner"]
    if (
        not isinstance(owner, str)
        or not owner.strip()
        or len(owner) > MAX_OWNER_LEN
        or _CONTROL.search(owner)
    ):
        problems.append(f"{where}: owner must be a non-empty name of at most {MAX_OWNER_LEN} characters")
    roles = _string_list(raw["roles"])
    if roles is None:
        problems.append(f"{where}: roles must be a list of role names")
    else:
        for role in roles:
            if NAME_RE.fullmatch(role) is None:
                problems.append(f"{where}: role {role!r} must be a lower-case name ([a-z][a-z0-9_-]*)")
        if len(set(roles)) != len(roles):
            problems.append(f"{where}: roles lists a role twice")
    audiences = _string_list(raw["audiences"])
    if audiences is None:
        problems.append(f"{where}: audiences must be a list of audience names")
    else:
        for audience in audiences:
            if not is_valid_audience(audience):
                problems.append(
                    f"{where}: audience {audience!r} must be a name without spaces, commas or '*'"
                )
    methods = _string_list(raw["attestation"])
    if methods is None or not methods:
        problems.append(
            f"{where}: attestation must be a non-empty list drawn from {sorted(ATTESTATION_METHODS)}"
        )
    else:
        for method in methods:
            if method not in ATTESTATION_METHODS:
                problems.append(
                    f"{where}: attestation method {method!r} is not one of {sorted(ATTESTATION_METHODS)}"
                )
    delegators = _string_list(raw.get("delegators", []))
    if delegators is None:
        problems.append(f"{where}: delegators must be a list of workload names")
    else:
        for delegator in delegators:
            if NAME_RE.fullmatch(delegator) is None or delegator == name:
                problems.append(f"{where}: delegator {delegator!r} must be the name of another workload")
    if len(problems) > before:
        return None
    assert roles is not None and audiences is not None and methods is not None and prefix is not None
    assert delegators is not None
    return RegistryEntry(
        name=name,
        spiffe_id=raw["spiffe_id"],
        owner=owner,
        roles=tuple(roles),
        audiences=tuple(audiences),
        attestation=frozenset(methods),
        source=where,
        pattern_prefix=prefix or None,
        delegators=tuple(delegators),
    )
