"""Load-time validation: every bad line refuses the whole set and names its problem with file:line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import ALPHA, POLICY, SAMPLES, WORKLOADS, identity, intent, write_policy_dir

from broker.errors import PolicyLoadError
from broker.policy import SUPPORTED_MODEL, load_policies, policy_version

GOOD = "p, reader, orders-api, orders.read, customers/{customer}/orders/*, , allow, read-own, 300, jwt"

# (id, bad line, the problem it must report)
BAD_LINES = [
    ("effect 'Deny ' with trailing space", "p, reader, *, a.b, x/*, , Deny , r1, 60, jwt", "spelt exactly"),
    ("effect DENY", "p, reader, *, a.b, x/*, , DENY, r1, 60, jwt", "spelt exactly"),
    ("effect 'allow '", "p, reader, *, a.b, x/*, , allow , r1, 60, jwt", "spelt exactly"),
    ("effect permit", "p, reader, *, a.b, x/*, , permit, r1, 60, jwt", "must be 'allow', 'deny' or 'review'"),
    ("effect empty", "p, reader, *, a.b, x/*, , , r1, 60, jwt", "must be 'allow', 'deny' or 'review'"),
    (
        "duplicate rule id",
        "p, reader, *, a.b, x/*, , allow, read-own, 60, jwt",
        "already used at policy.csv:1",
    ),
    ("rule id upper case", "p, reader, *, a.b, x/*, , allow, Refund, 60, jwt", "rule id 'Refund'"),
    ("rule id leading dash", "p, reader, *, a.b, x/*, , allow, -x, 60, jwt", "rule id '-x'"),
    ("rule id empty", "p, reader, *, a.b, x/*, , allow, , 60, jwt", "rule id ''"),
    ("rule id with space", "p, reader, *, a.b, x/*, , allow, a b, 60, jwt", "rule id 'a b'"),
    ("ttl zero", "p, reader, *, a.b, x/*, , allow, r1, 0, jwt", "ttl '0'"),
    ("ttl above a day", "p, reader, *, a.b, x/*, , allow, r1, 86401, jwt", "ttl '86401'"),
    ("ttl negative", "p, reader, *, a.b, x/*, , allow, r1, -5, jwt", "ttl '-5'"),
    ("ttl fractional", "p, reader, *, a.b, x/*, , allow, r1, 1.5, jwt", "ttl '1.5'"),
    ("ttl text", "p, reader, *, a.b, x/*, , allow, r1, 5m, jwt", "ttl '5m'"),
    ("ttl leading zero", "p, reader, *, a.b, x/*, , allow, r1, 060, jwt", "ttl '060'"),
    ("allow without ttl", "p, reader, *, a.b, x/*, , allow, r1, -, -", "ttl '-'"),
    ("deny with half a dash", "p, reader, *, a.b, x/*, , deny, r1, -, jwt", "ttl '-'"),
    (
        "unknown credential kind",
        "p, reader, *, a.b, x/*, , allow, r1, 60, vault-db",
        "credential kind 'vault-db'",
    ),
    ("credential kind upper case", "p, reader, *, a.b, x/*, , allow, r1, 60, JWT", "credential kind 'JWT'"),
    ("unknown role", "p, auditor, *, a.b, x/*, , allow, r1, 60, jwt", "unknown role 'auditor'"),
    ("subject upper case", "p, Reader, *, a.b, x/*, , allow, r1, 60, jwt", "subject 'Reader'"),
    ("resource with ..", "p, reader, *, a.b, orders/../x, , allow, r1, 60, jwt", "'.' or '..' segment"),
    ("resource with .", "p, reader, *, a.b, orders/./x, , allow, r1, 60, jwt", "'.' or '..' segment"),
    ("resource with empty segment", "p, reader, *, a.b, orders//x, , allow, r1, 60, jwt", "empty"),
    ("resource with leading slash", "p, reader, *, a.b, /orders, , allow, r1, 60, jwt", "empty"),
    (
        "resource ** not last",
        "p, reader, *, a.b, orders/**/x, , allow, r1, 60, jwt",
        "only allowed as the last",
    ),
    ("resource partial wildcard", "p, reader, *, a.b, orders/ord-*, , allow, r1, 60, jwt", "whole segment"),
    ("resource bad ctx key", "p, reader, *, a.b, orders/{Customer}, , allow, r1, 60, jwt", "{Customer}"),
    ("resource regex", "p, reader, *, a.b, orders/[0-9]+, , allow, r1, 60, jwt", "segment '[0-9]+'"),
    ("resource empty", "p, reader, *, a.b, , , allow, r1, 60, jwt", "resource pattern is empty"),
    (
        "action upper case",
        "p, reader, *, Orders.read, x/*, , allow, r1, 60, jwt",
        "action pattern 'Orders.read'",
    ),
    (
        "action wildcard in the middle",
        "p, reader, *, *.read, x/*, , allow, r1, 60, jwt",
        "action pattern '*.read'",
    ),
    (
        "action double star",
        "p, reader, *, orders.**, x/*, , allow, r1, 60, jwt",
        "action pattern 'orders.**'",
    ),
    ("action trailing dot", "p, reader, *, orders., x/*, , allow, r1, 60, jwt", "action pattern 'orders.'"),
    ("action prefix too deep", "p, reader, *, a.b.c.d.*, x/*, , allow, r1, 60, jwt", "at most three"),
    ("audience partial wildcard", "p, reader, pay*, a.b, x/*, , allow, r1, 60, jwt", "audience 'pay*'"),
    ("audience with space", "p, reader, pay api, a.b, x/*, , allow, r1, 60, jwt", "audience 'pay api'"),
    (
        "condition syntax: missing value",
        'p, reader, *, a.b, x/*, "amount <=", allow, r1, 60, jwt',
        "ends where",
    ),
    (
        "condition syntax: no operator",
        'p, reader, *, a.b, x/*, "amount 50", allow, r1, 60, jwt',
        "expected one of",
    ),
    (
        "condition syntax: dangling &&",
        'p, reader, *, a.b, x/*, "amount <= 50 &&", allow, r1, 60, jwt',
        "ends where",
    ),
    ("condition syntax: ||", 'p, reader, *, a.b, x/*, "a == 1 || b == 2", allow, r1, 60, jwt', "'|'"),
    ("condition syntax: parentheses", 'p, reader, *, a.b, x/*, "(amount <= 50)", allow, r1, 60, jwt', "'('"),
    ("condition syntax: negation", 'p, reader, *, a.b, x/*, "!flag == true", allow, r1, 60, jwt', "'!'"),
    (
        "condition syntax: unterminated string",
        'p, reader, *, a.b, x/*, "c == \'EUR", allow, r1, 60, jwt',
        "unterminated",
    ),
    (
        "condition syntax: double-quoted string",
        'p, reader, *, a.b, x/*, "c == ""EUR""", allow, r1, 60, jwt',
        "'\"'",
    ),
    (
        "condition syntax: ordering a string",
        "p, reader, *, a.b, x/*, \"c < 'EUR'\", allow, r1, 60, jwt",
        "needs a number",
    ),
    (
        "condition syntax: in without a list",
        "p, reader, *, a.b, x/*, \"c in 'EUR'\", allow, r1, 60, jwt",
        "needs a list",
    ),
    ("condition syntax: = instead of ==", 'p, reader, *, a.b, x/*, "amount = 5", allow, r1, 60, jwt', "'='"),
    (
        "condition syntax: upper-case key",
        'p, reader, *, a.b, x/*, "Amount == 5", allow, r1, 60, jwt',
        "not a context key",
    ),
    (
        "condition syntax: malformed number",
        'p, reader, *, a.b, x/*, "amount == 1.2.3", allow, r1, 60, jwt',
        "malformed number",
    ),
    ("unknown function", 'p, reader, *, a.b, x/*, "len(name) > 3", allow, r1, 60, jwt', "'('"),
    (
        "unknown function keyMatch",
        'p, reader, *, a.b, x/*, "keyMatch(r_obj, p_obj)", allow, r1, 60, jwt',
        "'('",
    ),
    (
        "injection: __import__",
        "p, reader, *, a.b, x/*, \"__import__('os').system('id')\", allow, r1, 60, jwt",
        "unexpected character '('",
    ),
    (
        "injection: value is a call",
        "p, reader, *, a.b, x/*, \"x == __import__('os')\", allow, r1, 60, jwt",
        "unexpected character '('",
    ),
    (
        "injection: bare name value",
        'p, reader, *, a.b, x/*, "x == __builtins__", allow, r1, 60, jwt',
        "expected a value",
    ),
    ("injection: attribute access", 'p, reader, *, a.b, x/*, "x.__class__ == 1", allow, r1, 60, jwt', "'.'"),
    ("injection: statement", 'p, reader, *, a.b, x/*, "x == 1; import os", allow, r1, 60, jwt', "';'"),
    (
        "injection: casbin names",
        'p, reader, *, a.b, x/*, "r_sub == p_sub", allow, r1, 60, jwt',
        "expected a value",
    ),
    (
        "injection: always true",
        'p, reader, *, a.b, x/*, "true", allow, r1, 60, jwt',
        "expected a context key",
    ),
    ("injection: lambda", 'p, reader, *, a.b, x/*, "x == lambda: 1", allow, r1, 60, jwt', "':'"),
    ("unknown line type p2", "p2, reader, *, a.b, x/*, , allow, r1, 60, jwt", "unknown line type 'p2'"),
    ("unknown line type P", "P, reader, *, a.b, x/*, , allow, r1, 60, jwt", "unknown line type 'P'"),
    ("unknown line type g2", "g2, reader, writer", "unknown line type 'g2'"),
    ("too few columns", "p, reader, *, a.b, x/*, , allow, r1, 60", "found 8"),
    ("too many columns", "p, reader, *, a.b, x/*, , allow, r1, 60, jwt, dpop, extra", "found 11"),
    ("unknown binding", "p, reader, *, a.b, x/*, , allow, r1, 60, jwt, extra", "found 10"),
    ("deny with a binding", "p, reader, *, a.b, x/*, , deny, r1, -, -, dpop", "cannot demand a binding"),
    (
        "unquoted comma in a condition",
        "p, reader, *, a.b, x/*, c in ['EUR', 'USD'], allow, r1, 60, jwt",
        "found 10",
    ),
    ("broken quoting", 'p, reader, *, a.b, x/*, "unterminated, allow, r1, 60, jwt', "not a valid CSV line"),
    ("g line: too many fields", "g, refunder, reader, extra", "'g, <role>, <parent role>'"),
    ("g line: self link", "g, reader, reader", "cannot inherit from itself"),
    ("g line: unknown role", "g, auditer, reader", "unknown role 'auditer'"),
    ("g line: links a workload", "g, alpha, reader", "'alpha' is a workload"),
    ("g line: cycle", "g, reader, refunder", "cycle"),
    ("g line: repeated", "g, refunder, reader", "repeats policy.csv"),
]


def _policy_with(line: str) -> str:
    return f"{GOOD}\ng, refunder, reader\n{line}\n"


@pytest.mark.parametrize(("line", "problem"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_refuses_the_set(tmp_path: Path, line: str, problem: str) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path, policy=_policy_with(line)))
    assert all(p.startswith("policy.csv:") for p in err.value.problems), err.value.problems
    assert any(problem in p for p in err.value.problems), err.value.problems
    assert any("policy.csv:3" in p or "policy.csv: " in p for p in err.value.problems), err.value.problems


def test_every_problem_is_listed(tmp_path: Path) -> None:
    lines = "\n".join(line for _, line, _ in BAD_LINES[:6])
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path, policy=f"{GOOD}\n{lines}\n"))
    for number in range(2, 8):
        assert any(p.startswith(f"policy.csv:{number}:") for p in err.value.problems), (
            number,
            err.value.problems,
        )
    assert "policy set refused" in str(err.value)


def test_comma_inside_a_quoted_condition(tmp_path: Path) -> None:
    policy = """\
# comments and blank lines are fine

p, refunder, payments-api, payments.refund, orders/*, "currency in ['EUR', 'USD'] && amount <= 10", \
allow, tiny, 30, jwt
   # an indented comment
"""
    policy_set = load_policies(write_policy_dir(tmp_path, policy=policy))
    (rule,) = policy_set.rules
    assert rule.condition_text == "currency in ['EUR', 'USD'] && amount <= 10"
    assert (rule.effect, rule.rule_id, rule.ttl, rule.kind, rule.source) == (
        "allow",
        "tiny",
        30,
        "jwt",
        "policy.csv:3",
    )
    workload = policy_set.resolve_workload(identity(ALPHA))
    allow = policy_set.decide(
        workload, "payments-api", intent("payments.refund", "orders/o1", currency="USD", amount=9)
    )
    assert allow.rule_id == "tiny"
    deny = policy_set.decide(
        workload, "payments-api", intent("payments.refund", "orders/o1", currency="GBP", amount=9)
    )
    assert deny.effect == "deny"


def test_deny_rows_may_carry_ttl_and_kind(tmp_path: Path) -> None:
    policy_set = load_policies(write_policy_dir(tmp_path, policy="p, *, *, x.y, **, , deny, d, 60, jwt\n"))
    assert policy_set.rules[0].ttl == 60  # ignored: a deny issues nothing
    workload = policy_set.resolve_workload(identity(ALPHA))
    decision = policy_set.decide(workload, "orders-api", intent("x.y", "a"))
    assert (decision.effect, decision.rule_id, decision.max_ttl, decision.credential_kind) == (
        "deny",
        "d",
        None,
        None,
    )


# -- registry --------------------------------------------------------------------------------------

ENTRY = """
[[workload]]
name = "{name}"
spiffe_id = "{spiffe_id}"
owner = "{owner}"
roles = {roles}
audiences = {audiences}
attestation = {attestation}
"""


def _entry(**overrides: str) -> str:
    fields = {
        "name": "solo",
        "spiffe_id": "spiffe://t.example/ns/s/sa/solo",
        "owner": "Sol Owner <sol@example.com>",
        "roles": '["reader"]',
        "audiences": '["orders-api"]',
        "attestation": '["kubernetes"]',
    }
    fields.update(overrides)
    return ENTRY.format(**fields)


BAD_REGISTRY = [
    ("not a SPIFFE ID", _entry(spiffe_id="https://t.example/solo"), "is not a SPIFFE ID"),
    ("upper-case trust domain", _entry(spiffe_id="spiffe://T.example/solo"), "is not a SPIFFE ID"),
    ("trailing slash", _entry(spiffe_id="spiffe://t.example/solo/"), "is not a SPIFFE ID"),
    ("dot segment", _entry(spiffe_id="spiffe://t.example/ns/../solo"), "is not a SPIFFE ID"),
    ("trust domain only", _entry(spiffe_id="spiffe://t.example"), "names a trust domain"),
    (
        "star in the middle",
        _entry(spiffe_id="spiffe://t.example/ns/*/solo"),
        "only as the whole last segment",
    ),
    ("partial star", _entry(spiffe_id="spiffe://t.example/ns/solo-*"), "only as the whole last segment"),
    ("double star", _entry(spiffe_id="spiffe://t.example/ns/**"), "only as the whole last segment"),
    ("empty owner", _entry(owner=" "), "owner must be"),
    ("bad name", _entry(name="Solo"), "name 'Solo'"),
    ("roles not a list", _entry(roles='"reader"'), "roles must be a list"),
    ("bad role", _entry(roles='["Reader"]'), "role 'Reader'"),
    ("audiences not a list", _entry(audiences='"orders-api"'), "audiences must be a list"),
    ("wildcard audience", _entry(audiences='["*"]'), "audience '*'"),
    ("unknown attestation", _entry(attestation='["password"]'), "attestation method 'password'"),
    ("no attestation", _entry(attestation="[]"), "non-empty list"),
    ("unknown key", _entry() + 'extra = "x"\n', "unknown key 'extra'"),
    ("missing key", _entry().replace('owner = "Sol Owner <sol@example.com>"\n', ""), "missing 'owner'"),
    ("duplicate name", _entry() + _entry(spiffe_id="spiffe://t.example/other"), "name 'solo' already used"),
    ("duplicate SPIFFE ID", _entry() + _entry(name="solo2"), "already registered"),
    ("role named like a workload", _entry(roles='["reader", "alpha"]'), "role 'alpha' is also a workload"),
    ("key after the last table", _entry() + 'trust_domain = "t.example"\n', "unknown key 'trust_domain'"),
    ("not TOML", "[[workload]\nname = ", "not valid TOML"),
]


@pytest.mark.parametrize(
    ("entry", "problem"), [c[1:] for c in BAD_REGISTRY], ids=[c[0] for c in BAD_REGISTRY]
)
def test_bad_registry_refuses_the_set(tmp_path: Path, entry: str, problem: str) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path, workloads=WORKLOADS + entry))
    assert any(problem in p for p in err.value.problems), err.value.problems
    assert all(p.startswith("workloads.toml") for p in err.value.problems), err.value.problems


def test_unknown_top_level_key(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="unknown top-level key 'trust_domain'"):
        load_policies(write_policy_dir(tmp_path, workloads='trust_domain = "t.example"\n' + WORKLOADS))


def test_registry_problem_names_the_line(tmp_path: Path) -> None:
    workloads = WORKLOADS + _entry(attestation='["password"]')
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path, workloads=workloads))
    header = next(
        n for n, line in reversed(list(enumerate(workloads.splitlines(), 1))) if line == "[[workload]]"
    )
    assert err.value.problems[0].startswith(f"workloads.toml:{header}: ")


# -- model.conf ------------------------------------------------------------------------------------

BAD_MODELS = [
    (
        "a looser matcher",
        SUPPORTED_MODEL.replace("resourceMatch(r.obj, p.obj, r.ctx)", "keyMatch(r.obj, p.obj)"),
        "[matchers] m differs",
    ),
    (
        "allow-override effect",
        SUPPORTED_MODEL.replace(" && !some(where (p.eft == deny))", ""),
        "[policy_effect] e differs",
    ),
    ("fewer policy columns", SUPPORTED_MODEL.replace(", ttl, kind", ""), "[policy_definition] p differs"),
    (
        "a second role definition",
        SUPPORTED_MODEL.replace("g = _, _", "g = _, _\ng2 = _, _"),
        "[role_definition] g2 is not supported",
    ),
    ("no matchers", SUPPORTED_MODEL.split("[matchers]")[0], "[matchers] m is missing"),
    ("not a model", "this is not ini", "not a Casbin model"),
]


@pytest.mark.parametrize(("model", "problem"), [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS])
def test_other_models_are_refused(tmp_path: Path, model: str, problem: str) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path, model=model))
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_model_formatting_and_comments_are_free(tmp_path: Path) -> None:
    model = "# our model\n" + SUPPORTED_MODEL.replace(" && ", "&&").replace("r = sub, aud", "r = sub,aud")
    load_policies(write_policy_dir(tmp_path, model=model))


def test_shipped_model_is_the_supported_one() -> None:
    load_policies(SAMPLES)  # model.conf with comments loads
    assert "deny" in (SAMPLES / "model.conf").read_text()


@pytest.mark.parametrize("missing", ["model.conf", "policy.csv", "workloads.toml"])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    directory = write_policy_dir(tmp_path)
    (directory / missing).unlink()
    with pytest.raises(PolicyLoadError, match=f"{missing}: missing"):
        load_policies(directory)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="not a policy directory"):
        load_policies(tmp_path / "nope")


def test_not_utf8(tmp_path: Path) -> None:
    directory = write_policy_dir(tmp_path)
    (directory / "policy.csv").write_bytes(b"p, reader, *, a.b, x/\xff, , allow, r1, 60, jwt\n")
    with pytest.raises(PolicyLoadError, match=r"policy\.csv: not UTF-8"):
        load_policies(directory)


def test_load_time_probe_refuses_a_raising_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.policy._conditions import Clause

    def explode(self: Clause, ctx: object) -> bool:
        raise ZeroDivisionError

    monkeypatch.setattr(Clause, "evaluate", explode)
    with pytest.raises(PolicyLoadError) as err:
        load_policies(write_policy_dir(tmp_path))
    assert any(
        "refund-small" in p and "load-time probe" in p and "ZeroDivisionError" in p
        for p in err.value.problems
    )


def test_too_deep_role_inheritance(tmp_path: Path) -> None:
    chain = "\n".join(
        f"g, {a}, {b}"
        for a, b in zip(["reader", *[f"l{i}" for i in range(9)]], [f"l{i}" for i in range(10)], strict=False)
    )
    with pytest.raises(PolicyLoadError, match="inherits through more than 7 levels"):
        load_policies(write_policy_dir(tmp_path, policy=f"{GOOD}\n{chain}\n"))


# -- version ---------------------------------------------------------------------------------------


def test_version_is_the_digest_of_the_files(tmp_path: Path) -> None:
    directory = write_policy_dir(tmp_path, tests="# no cases\n")
    (directory / "README.md").write_text("not part of the policy")
    digest = hashlib.sha256()
    for name in sorted(["model.conf", "policy.csv", "tests.toml", "workloads.toml"]):
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    version = load_policies(directory).version
    assert version == "sha256:" + digest.hexdigest()
    assert version == policy_version(
        (p.name, p.read_bytes()) for p in directory.iterdir() if p.suffix != ".md"
    )


@pytest.mark.parametrize("name", ["model.conf", "policy.csv", "workloads.toml", "tests.toml"])
def test_any_file_change_changes_the_version(tmp_path: Path, name: str) -> None:
    directory = write_policy_dir(tmp_path, tests="# no cases\n")
    before = load_policies(directory).version
    with (directory / name).open("a") as f:
        f.write("\n# touched\n")
    assert load_policies(directory).version != before
    (directory / "README.md").write_text("x")
    after = load_policies(directory).version
    (directory / "README.md").write_text("y")
    assert load_policies(directory).version == after


def test_same_files_same_version(tmp_path: Path) -> None:
    a = load_policies(write_policy_dir(tmp_path / "a")).version
    b = load_policies(write_policy_dir(tmp_path / "b")).version
    assert a == b and a.startswith("sha256:") and len(a) == len("sha256:") + 64
    assert load_policies(write_policy_dir(tmp_path / "c", policy=POLICY + "\n")).version != a
