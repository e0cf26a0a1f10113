"""The vault-* credential kinds a rule may name: a table of accepted and refused spellings."""

from __future__ import annotations

import pytest

from broker.errors import InvalidTarget
from broker.vault.kinds import VAULT_DB_CREDS, VAULT_TOKEN, VAULT_WRAPPED, check_requested_type, parse_vault_kind

ACCEPTED = [
    ("vault-db:orders-reader", "vault-db", "orders-reader", (), 0, VAULT_DB_CREDS),
    ("vault-token:kb-config-read", "vault-token", "kb-config-read", ("kb-config-read",), 1, VAULT_TOKEN),
    ("vault-token:a+b;uses=3", "vault-token", "a+b", ("a", "b"), 3, VAULT_TOKEN),
    ("vault-wrapped:kv/support/smtp", "vault-wrapped", "kv/support/smtp", (), 0, VAULT_WRAPPED),
]

REFUSED = [
    ("vault-db", "needs a target"),
    ("vault-db:", "needs a target"),
    ("vault-db:../sys", "must match"),
    ("vault-db:Orders", "must match"),
    ("vault-db:a/b", "must match"),
    ("vault-ssh:x", "is not jwt"),
    ("vault-token:root", "not root/default"),
    ("vault-token:default", "not root/default"),
    ("vault-token:a+a", "repeated"),
    ("vault-token:a+", "must be a named policy"),
    ("vault-token:a;uses=0", "uses=<1..100>"),
    ("vault-token:a;uses=101", "uses=<1..100>"),
    ("vault-token:a;ttl=5", "uses=<1..100>"),
    ("vault-wrapped:secret/x", "must be kv/<path>"),
    ("vault-wrapped:kv/../sys/x", "must be kv/<path>"),
    ("vault-wrapped:kv/a/", "must be kv/<path>"),
]


@pytest.mark.parametrize(("text", "family", "target", "policies", "uses", "urn"), ACCEPTED)
def test_accepted_kinds(text: str, family: str, target: str, policies: tuple[str, ...], uses: int,
                        urn: str) -> None:
    kind = parse_vault_kind(text)
    assert (kind.family, kind.target, kind.policies, kind.uses, kind.token_type) == (
        family, target, policies, uses, urn)


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_refused_kinds(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        parse_vault_kind(text)


@pytest.mark.parametrize(
    ("kind", "requested", "error"),
    [
        ("vault-db:r", VAULT_DB_CREDS, None),
        ("vault-db:r", None, "set requested_token_type"),
        ("vault-db:r", "urn:ietf:params:oauth:token-type:access_token", "set requested_token_type"),
        ("vault-db:r", VAULT_TOKEN, "set requested_token_type"),
        ("jwt", None, None),
        ("jwt", "urn:ietf:params:oauth:token-type:access_token", None),
        ("jwt", VAULT_WRAPPED, "served as a task token"),
    ],
)
def test_requested_type_must_match_the_rule(kind: str, requested: str | None, error: str | None) -> None:
    if error is None:
        check_requested_type(kind, requested)
    else:
        with pytest.raises(InvalidTarget, match=error):
            check_requested_type(kind, requested)


def test_policy_set_refuses_a_bad_vault_kind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker.errors import PolicyLoadError
    from broker.policy import load_policies
    from tests.vault.conftest import policies_with

    bad = policies_with(tmp_path, "p, support-agent, orders-db, orders.query, x, , allow, r1, 60, vault-db:a/b")
    with pytest.raises(PolicyLoadError, match=r"policy.csv:\d+: vault-db role 'a/b' must match"):
        load_policies(bad)
