"""Entry schema v1 for the kinds issue 5 and 6 added: revocation, suspension, DPoP-bound issuance."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from broker.audit.errors import EntrySchemaError
from broker.audit.schema import validate_entry

OPERATOR = {"kind": "operator", "name": "ops-lead", "role": "admin", "auth": "bearer"}
CLIENT = {"kind": "client", "client_id": "orders-api", "auth": "client_secret"}
ENVELOPE = {"v": 1, "time": "2026-11-23T12:00:00Z", "request_id": "r-1"}
REVOKE_TOKEN = {**ENVELOPE, "kind": "revocation", "actor": CLIENT,
                "revocation": {"scope": "token", "jti": "abc_DEF-123", "workload": "support-assistant",
                               "reason": "RFC 7009 revocation"}}
REVOKE_SCOPE = {**ENVELOPE, "kind": "revocation", "actor": OPERATOR,
                "revocation": {"scope": "conversation", "value": "conv-1", "reason": "leak"}}
SUSPEND = {**ENVELOPE, "kind": "suspension", "actor": OPERATOR,
           "suspension": {"workload": "support-assistant", "state": "suspended", "reason": "incident 42"}}


def changed(entry: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``entry`` with the member at dotted ``path`` set to ``value`` (``...`` deletes it)."""
    out = copy.deepcopy(entry)
    *parents, last = path.split(".")
    target = out
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return out


@pytest.mark.parametrize("entry", [REVOKE_TOKEN, REVOKE_SCOPE, SUSPEND,
                                   changed(SUSPEND, "suspension.state", "resumed")])
def test_valid_entries(entry: dict[str, Any]) -> None:
    assert validate_entry(entry).kind == entry["kind"]


@pytest.mark.parametrize(
    ("entry", "path", "problem"),
    [
        (changed(REVOKE_SCOPE, "revocation.scope", "everything"), "revocation.scope", "must be one of"),
        (changed(REVOKE_SCOPE, "revocation.value", ...), "revocation.value", "is required"),
        (changed(REVOKE_TOKEN, "revocation.jti", ...), "revocation.jti", "is required"),
        (changed(REVOKE_TOKEN, "revocation.value", "x"), "revocation.value", "is not a member"),
        (changed(REVOKE_SCOPE, "actor.kind", "root"), "actor.kind",
         "must be one of 'operator', 'client', 'workload', 'broker'"),
        (changed(REVOKE_SCOPE, "actor.role", "superuser"), "actor.role", "must be one of"),
        (changed(REVOKE_SCOPE, "actor.token", "s3cret"), "actor.token", "is not a member"),
        (changed(REVOKE_SCOPE, "actor", ...), "actor", "is required"),
        (changed(SUSPEND, "suspension.state", "paused"), "suspension.state", "must be one of"),
        (changed(SUSPEND, "suspension.workload", "Not A Name"), "suspension.workload", "is not a workload name"),
        (changed(SUSPEND, "suspension.reason", ""), "suspension.reason", "must not be empty"),
    ],
)
def test_invalid_entries_name_the_member(entry: dict[str, Any], path: str, problem: str) -> None:
    with pytest.raises(EntrySchemaError) as caught:
        validate_entry(entry)
    assert caught.value.member == path
    assert problem in str(caught.value)
