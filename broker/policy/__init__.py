"""The intent policy: who may do what, on which resource, under which conditions, for how long.

Entry points:

- :func:`load_policies` reads a policy directory (``model.conf``, ``policy.csv``, ``workloads.toml``,
  ``tests.toml``), validates every line and returns a :class:`PolicySet`, or raises
  :class:`~broker.errors.PolicyLoadError` listing every problem. Nothing loads partially.
- :meth:`PolicySet.resolve_workload` maps an attested identity to its registry entry.
- :meth:`PolicySet.authorize` returns a :class:`~broker.models.Grant` or raises; it is the only
  place a ``Grant`` is built. :meth:`PolicySet.decide` returns a :class:`Decision` and never raises.
- :meth:`PolicySet.explain` traces every candidate rule part by part.
- :mod:`broker.policy.testing` runs the cases of ``tests.toml``.

Rule syntax (``policy.csv``)::

    p, <subject>, <audience>, <action>, <resource>, <condition>, <allow|deny>, <rule id>, <ttl>, <kind>[, <binding>]
    g, <role>, <parent role>

Deny wins; among matching allow rules the smallest TTL decides; no match is a deny.
"""

from ._conditions import ConditionError, compile_condition
from ._rules import ANY_WORKLOAD, BINDINGS, CREDENTIAL_KINDS, MAX_TTL, Rule
from .engine import Decision, Explanation, PartResult, PolicySet, RuleTrace
from .loader import POLICY_FILES, SUPPORTED_MODEL, directory_version, load_policies, policy_version
from .registry import ATTESTATION_METHODS, RegistryEntry, WorkloadRegistry

__all__ = [
    "ANY_WORKLOAD",
    "ATTESTATION_METHODS",
    "BINDINGS",
    "CREDENTIAL_KINDS",
    "MAX_TTL",
    "POLICY_FILES",
    "SUPPORTED_MODEL",
    "ConditionError",
    "Decision",
    "Explanation",
    "PartResult",
    "PolicySet",
    "RegistryEntry",
    "Rule",
    "RuleTrace",
    "WorkloadRegistry",
    "compile_condition",
    "directory_version",
    "load_policies",
    "policy_version",
]
