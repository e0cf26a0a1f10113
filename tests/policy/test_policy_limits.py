"""limits.toml: uses, rates and value budgets of allow rules; any bad table refuses the whole set."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from broker.errors import PolicyLoadError
from broker.policy import load_policies, policy_version
from broker.policy.limits import Budget, RuleLimits, to_minor_units

SAMPLES = Path(__file__).resolve().parents[2] / "policies"


def policy_dir(tmp_path: Path, limits: str | None) -> Path:
    target = tmp_path / "policies"
    target.mkdir(parents=True)
    for name in ("model.conf", "policy.csv", "workloads.toml", "approvals.toml"):
        shutil.copy(SAMPLES / name, target / name)
    if limits is not None:
        (target / "limits.toml").write_text(limits)
    return target


def test_sample_limits() -> None:
    limits = load_policies(SAMPLES).limits
    assert limits["refund-small-eur"] == RuleLimits(
        rule_id="refund-small-eur", uses=1, rate=(30, 60),
        budget=Budget(key="amount", currency="EUR", max_minor=20000, per="conversation", period="day",
                      period_seconds=86400),
    )
    assert limits["tickets-create"].rate == (120, 60)
    assert "orders-read-own-customer" not in limits


def test_limits_are_part_of_the_policy_version(tmp_path: Path) -> None:
    without = load_policies(policy_dir(tmp_path / "a", None))
    with_limits = load_policies(policy_dir(tmp_path / "b", '[[limit]]\nrule = "kb-read"\nuses = 3\n'))
    assert without.limits == {}
    assert with_limits.limits["kb-read"].uses == 3
    assert without.version != with_limits.version
    files = [(p.name, p.read_bytes()) for p in (tmp_path / "b" / "policies").iterdir()]
    assert with_limits.version == policy_version(files)


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ("[[limit]]\nrule = 'nope'\nuses = 1\n", "rule 'nope' is not a rule id of policy.csv"),
        ("[[limit]]\nrule = 'no-customer-export'\nuses = 1\n", "'no-customer-export' is a deny rule"),
        ("[[limit]]\nrule = 'kb-read'\n", "a [[limit]] needs uses, rate or budget"),
        ("[[limit]]\nrule = 'kb-read'\nuses = 0\n", "uses must be an integer from 1 to 1000"),
        ("[[limit]]\nrule = 'kb-read'\nuses = true\n", "uses must be an integer"),
        ("[[limit]]\nrule = 'kb-read'\nuses = 1.5\n", "uses must be an integer"),
        ("[[limit]]\nrule = 'kb-read'\nrate = '10/fortnight'\n", "rate must look like '30/minute'"),
        ("[[limit]]\nrule = 'kb-read'\nrate = '0/minute'\n", "rate must look like"),
        ("[[limit]]\nrule = 'kb-read'\nrate = '10/minute\\n'\n", "rate must look like"),
        ("[[limit]]\nrule = 'kb-read'\nuses = 1\ncolour = 'red'\n", "unknown key 'colour' in [[limit]]"),
        ("[[limit]]\nrule = 'kb-read'\nuses = 1\n[[limit]]\nrule = 'kb-read'\nuses = 2\n", "already has a [[limit]]"),
        ("limit = 3\n", "'limit' must be an array of tables"),
        ("[other]\n", "unknown top-level key 'other'"),
        ("[[limit]\n", "not valid TOML"),
        ("[[limit]]\nrule = 'kb-read'\nbudget = 5\n", "budget must be a table"),
    ],
)
def test_bad_limits_refuse_the_set(tmp_path: Path, limits: str, problem: str) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policies(policy_dir(tmp_path, limits))
    assert any(problem in p for p in err.value.problems), err.value.problems


BUDGET = {"key": "'amount'", "currency": "'EUR'", "max": "'200.00'", "per": "'conversation'", "period": "'day'"}


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"max": "'200.001'"}, "budget max must be a positive amount with at most 2 decimals for EUR"),
        ({"max": "'200.5'", "currency": "'JPY'"}, "positive amount with at most 0 decimals for JPY"),
        ({"max": "'1.0001'", "currency": "'KWD'"}, "with at most 3 decimals for KWD"),
        ({"currency": None}, "[limit.budget] is missing 'currency'"),
        ({"currency": "'XAU'"}, "ISO 4217 code with a minor unit"),
        ({"currency": "'ZZZ'"}, "ISO 4217 code with a minor unit"),
        ({"max": "0"}, "budget max must be a positive amount"),
        ({"max": "200.5"}, "written as an integer or a string"),  # a TOML float is not exact
        ({"max": "'-5'"}, "budget max must be a positive amount"),
        ({"max": "'NaN'"}, "budget max must be a positive amount"),
        ({"per": "'workload'"}, "budget per must be one of ['conversation', 'end_user']"),
        ({"period": "'second'"}, "budget period must be minute, hour or day"),
        ({"period": "'week'"}, "budget period must be minute, hour or day"),
        ({"currency": "'eur'"}, "ISO 4217"),
        ({"key": "'Amount'"}, "budget key must name an intent-context key"),
        ({"key": None}, "[limit.budget] is missing 'key'"),
        ({"cap": "1"}, "unknown key 'cap' in [limit.budget]"),
    ],
)
def test_bad_budgets_refuse_the_set(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    fields = {**BUDGET, **change}
    body = "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)
    with pytest.raises(PolicyLoadError) as err:
        load_policies(policy_dir(tmp_path, f"[[limit]]\nrule = 'refund-small-eur'\n[limit.budget]\n{body}"))
    assert any(problem in p for p in err.value.problems), err.value.problems


@pytest.mark.parametrize(
    ("value", "minor"),
    [
        (50, 5000), (49.99, 4999), ("0.01", 1), (33.34, 3334), ("200.00", 20000), (0.1, 10),
        (10.005, None), (0, None), (-1, None), (True, None), (None, None), ("abc", None), ("Infinity", None),
        ("1e2", 10000), ([1], None), (1e300, None),
    ],
)
def test_minor_units(value: Any, minor: int | None) -> None:
    assert to_minor_units(value) == minor


@pytest.mark.parametrize(
    ("value", "currency", "minor"),
    [
        (1000, "JPY", 1000), ("1000", "JPY", 1000), (10.0, "JPY", 10), (10.5, "JPY", None),
        (1.234, "KWD", 1234), (1.2345, "KWD", None), ("0.001", "BHD", 1), (0.0001, "CLF", 1),
        (20, "USD", 2000), (0.001, "USD", None), (20, "XAU", None), (20, "eur", None),
    ],
)
def test_minor_units_follow_the_currency_exponent(value: Any, currency: str, minor: int | None) -> None:
    assert to_minor_units(value, currency) == minor
