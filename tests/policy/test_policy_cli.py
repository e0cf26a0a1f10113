"""``nhi-broker policy test|explain|lint`` and the policy test runner, on the shipped samples and on
broken directories."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from conftest import ALPHA, SAMPLES, identity, intent, write_policy_dir

from broker.cli import policy_cmd
from broker.errors import PolicyLoadError
from broker.policy import PolicySet, load_policies
from broker.policy.testing import load_cases, run_policy_tests

SUPPORT = "spiffe://example.org/ns/support/sa/support-assistant"


def run(argv: list[str]) -> int:
    """A stand-in for ``nhi-broker``: the same subparsers the lead's main adds."""
    parser = argparse.ArgumentParser(prog="nhi-broker")
    sub = parser.add_subparsers(dest="command")
    policy_cmd.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# -- the shipped samples ---------------------------------------------------------------------------


def test_shipped_samples_pass(samples: PolicySet) -> None:
    results = run_policy_tests(samples, SAMPLES / "tests.toml")
    assert len(results) >= 15
    assert [r.name for r in results if not r.passed] == []
    outcomes = {r.outcome for r in results}
    assert outcomes == {"allow", "review", "deny", "unregistered", "invalid_target"}
    # the cases the samples promise
    by_name = {r.name: r for r in results}
    assert by_name["support may not export customer data"].rule_id == "no-customer-export"
    assert by_name["refund over the limit is held for review"].rule_id == "refund-review-eur"
    assert by_name["triage is denied refunds by its deny rule"].rule_id == "triage-no-payments"
    assert by_name["support refunds 20 EUR for the verified customer"].max_ttl == 120


def test_policy_test_fails_a_case_where_casbin_disagrees(samples: PolicySet, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    # Casbin is the reference: a case whose request-path decision is not Casbin's fails, even when
    # the decision is what the case expects.
    monkeypatch.setattr(PolicySet, "casbin_decision",
                        lambda self, workload, audience, intent, user=None: ("deny", None))
    by_name = {r.name: r for r in run_policy_tests(samples, SAMPLES / "tests.toml")}
    refund = by_name["support refunds 20 EUR for the verified customer"]
    assert not refund.passed and "Casbin disagree" in refund.message


def test_explain_names_casbins_answer(samples: PolicySet) -> None:
    workload = samples.resolve_workload(identity(SUPPORT))
    text = samples.explain(workload, "orders-api", intent("orders.read", "customers/c-1/orders/o-1", customer="c-1")
                           ).render()
    assert "casbin    allow by rule orders-read-own-customer" in text and "DISAGREES" not in text


def test_cli_test_on_samples(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(SAMPLES.parent)  # default --policies is ./policies
    assert run(["policy", "test"]) == 0
    out = capsys.readouterr().out
    cases = len(load_cases(SAMPLES / "tests.toml"))
    assert out.count("PASS  ") == cases
    assert f"{cases} passed, 0 failed" in out
    assert load_policies(SAMPLES).version in out


def test_cli_lint_on_samples(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "lint", "--policies", str(SAMPLES)]) == 0
    out = capsys.readouterr().out
    assert f"version {load_policies(SAMPLES).version}" in out
    assert "ok: " in out


def test_cli_explain(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "policy",
        "explain",
        "--policies",
        str(SAMPLES),
        "--workload",
        SUPPORT,
        "--audience",
        "payments-api",
        "--action",
        "payments.refund",
        "--resource",
        "customers/c-1/orders/o-1",
        "--context",
        '{"customer": "c-1", "amount": 75, "currency": "EUR"}',
        "--user-sub",
        "c-1",
        "--user-iss",
        "https://login.example.org",
    ]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "refund-small-eur" in out and "FAIL condition  amount <= 50" in out
    assert "REVIEW: held for review by rule refund-review-eur" in out
    assert "held for 1 approval(s) by group refund-approvers, waiting at most 900s" in out

    argv[argv.index("--context") + 1] = '{"customer": "c-1", "amount": 25, "currency": "EUR"}'
    assert run(argv) == 0
    assert "ALLOW: allowed by rule refund-small-eur" in capsys.readouterr().out
    # Without the verified user, the refund is refused by the rule that requires one.
    assert run(argv[:argv.index("--user-sub")]) == 0
    out = capsys.readouterr().out
    assert "DENY: denied by rule refund-requires-verified-user" in out
    assert "user      (none: not a delegated request" in out


def test_cli_explain_notes_an_unregistered_audience(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            [
                "policy",
                "explain",
                "--policies",
                str(SAMPLES),
                "--workload",
                SUPPORT,
                "--audience",
                "kb-api",
                "--action",
                "kb.read",
                "--resource",
                "kb/articles/a",
            ]
        )
        == 0
    )
    assert "invalid_target" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--context", "{not json"], "--context must be a JSON object"),
        (["--context", "[1]"], "context must be a JSON object"),
        (["--context", '{"Bad": 1}'], "lower-case identifier"),
    ],
)
def test_cli_explain_bad_input(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    argv = [
        "policy",
        "explain",
        "--policies",
        str(SAMPLES),
        "--workload",
        SUPPORT,
        "--audience",
        "orders-api",
        "--action",
        "orders.read",
        "--resource",
        "customers/c-1/orders/o-1",
        *extra,
    ]
    assert run(argv) == 1
    assert message in capsys.readouterr().err


def test_cli_explain_refuses_a_malformed_resource(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            [
                "policy",
                "explain",
                "--policies",
                str(SAMPLES),
                "--workload",
                SUPPORT,
                "--audience",
                "orders-api",
                "--action",
                "orders.read",
                "--resource",
                "customers/c-1/../c-2",
            ]
        )
        == 1
    )
    assert "before policy" in capsys.readouterr().err


def test_cli_explain_unregistered(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        run(
            [
                "policy",
                "explain",
                "--policies",
                str(SAMPLES),
                "--workload",
                "spiffe://example.org/nobody",
                "--audience",
                "orders-api",
                "--action",
                "orders.read",
                "--resource",
                "x",
            ]
        )
        == 1
    )
    assert "unregistered: workload spiffe://example.org/nobody is not registered" in capsys.readouterr().out


def test_cli_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as err:
        run(["policy", "explain", "--workload", SUPPORT])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        run(["policy"])
    assert err.value.code == 2


# -- failures --------------------------------------------------------------------------------------

FAILING_CASES = f"""
[[case]]
name = "passes"
workload = "{ALPHA}"
audience = "payments-api"
action = "payments.refund"
resource = "orders/o1"
context = {{ amount = 20, currency = "EUR" }}
expect = "allow"
rule = "refund-small"

[[case]]
name = "wrong rule expected"
workload = "{ALPHA}"
audience = "payments-api"
action = "payments.refund"
resource = "orders/o1"
context = {{ amount = 5, currency = "EUR" }}
expect = "allow"
rule = "refund-small"

[[case]]
name = "wrong outcome expected"
workload = "{ALPHA}"
audience = "orders-api"
action = "secrets.read"
resource = "secrets/x"
expect = "allow"

[[case]]
name = "wrong ttl expected"
workload = "{ALPHA}"
audience = "payments-api"
action = "payments.refund"
resource = "orders/o1"
context = {{ amount = 20, currency = "EUR" }}
expect = "allow"
ttl = 300
"""


def test_cli_test_failures_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_policy_dir(tmp_path, tests=FAILING_CASES)
    assert run(["policy", "test", "--policies", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "PASS  passes" in out
    assert "FAIL  wrong rule expected: expected rule refund-small, got refund-tiny" in out
    assert "FAIL  wrong outcome expected: expected allow, got deny (denied by rule no-secrets)" in out
    assert "FAIL  wrong ttl expected: expected ttl 300, got 120" in out
    assert "[tests.toml:" in out
    assert "1 passed, 3 failed" in out


def test_cli_on_a_refused_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "policies"
    shutil.copytree(SAMPLES, directory)
    with (directory / "policy.csv").open("a") as f:
        f.write("p, support-agent, *, orders.read, orders/../x, , Deny , sneaky, 60, jwt\n")
    for command in (["lint"], ["test"]):
        assert run(["policy", *command, "--policies", str(directory)]) == 1
        err = capsys.readouterr().err
        assert "policy set refused (2 problems):" in err
        assert "'.' or '..' segment" in err and "spelt exactly" in err
    assert (
        run(
            [
                "policy",
                "explain",
                "--policies",
                str(directory),
                "--workload",
                SUPPORT,
                "--audience",
                "orders-api",
                "--action",
                "orders.read",
                "--resource",
                "x",
            ]
        )
        == 1
    )


def test_cli_lint_reports_bad_test_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_policy_dir(tmp_path, tests='[[case]]\nname = "x"\nexpect = "maybe"\n')
    assert run(["policy", "lint", "--policies", str(directory)]) == 1
    assert "tests.toml:1: [[case]] is missing 'workload'" in capsys.readouterr().err


def test_cli_test_without_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["policy", "test", "--policies", str(write_policy_dir(tmp_path))]) == 1
    assert "tests.toml: missing" in capsys.readouterr().err
    (tmp_path / "tests.toml").write_text("# none yet\n")
    assert run(["policy", "test", "--policies", str(tmp_path)]) == 1
    assert "no test cases" in capsys.readouterr().err


# -- tests.toml validation -------------------------------------------------------------------------

CASE = f"""
[[case]]
name = "c"
workload = "{ALPHA}"
audience = "orders-api"
action = "a.b"
resource = "x"
expect = "deny"
"""

BAD_CASES = [
    ("unknown expectation", CASE.replace('"deny"', '"maybe"'), "expect 'maybe'"),
    ("unknown key", CASE + 'expected = "allow"\n', "unknown key 'expected'"),
    ("missing key", CASE.replace('action = "a.b"\n', ""), "missing 'action'"),
    ("bad method", CASE + 'method = "password"\n', "method 'password'"),
    ("bad ttl", CASE + "ttl = -1\n", "ttl must be"),
    ("bad rule", CASE + "rule = 5\n", "rule must be"),
    ("bad context key", CASE + "context = { Amount = 1 }\n", "context key 'Amount'"),
    ("nested context", CASE + "context = { a = { b = 1 } }\n", "context.a must be"),
    ("context list of numbers", CASE + "context = { a = [1, 2] }\n", "context.a lists"),
    ("duplicate name", CASE + CASE, "case name 'c' is already used"),
    ("not TOML", "[[case]\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "problem"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_test_cases(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "tests.toml").write_text(text)
    with pytest.raises(PolicyLoadError) as err:
        load_cases(tmp_path / "tests.toml")
    assert any(problem in p for p in err.value.problems), err.value.problems
