"""The condition language and the anchored patterns, case by case."""

from __future__ import annotations

from typing import Any

import pytest

from broker.policy import ConditionError, compile_condition
from broker.policy._patterns import PatternError, compile_action_pattern, compile_resource_pattern

CTX: dict[str, Any] = {
    "amount": 20,
    "price": 19.5,
    "currency": "EUR",
    "vip": True,
    "off": False,
    "customer": "c-1",
    "owner": "c-1",
    "other": "c-2",
    "limit": 50,
    "text_amount": "20",
    "tags": ["a", "b"],
    "zero": 0,
}

# (condition, expected against CTX)
CONDITIONS = [
    ("", True),
    ("   ", True),
    ("amount <= 50", True),
    ("amount <= 20", True),
    ("amount < 20", False),
    ("amount >= 20 && amount > 19.99", True),
    ("price < 20", True),
    ("amount <= 50 && currency == 'EUR'", True),
    ("amount <= 50 && currency == 'USD'", False),
    ("currency != 'USD'", True),
    ("currency != 'EUR'", False),
    ("amount == 20", True),
    ("amount == 20.0", True),  # numbers compare by value
    ("amount != 21", True),
    ("currency in ['EUR', 'USD']", True),
    ("currency in ['GBP']", False),
    ("currency in []", False),
    ("amount in [10, 20]", True),
    ("amount in ['20']", False),  # typed: the number 20 is not the string '20'
    ("vip == true", True),
    ("vip == false", False),
    ("off == false", True),
    ("vip != false", True),
    ("owner == $customer", True),
    ("other == $customer", False),
    ("other != $customer", True),
    ("amount <= $limit", True),
    ("limit < $amount", False),
    ("amount > -5", True),
    ("zero == 0", True),
    # fail closed: missing keys and kind mismatches make a clause false, whatever the operator
    ("missing == 1", False),
    ("missing != 1", False),
    ("missing in ['a']", False),
    ("amount <= $missing", False),
    ("owner == $missing", False),
    ("text_amount <= 50", False),
    ("text_amount == 20", False),
    ("text_amount != 20", False),
    ("vip == 1", False),
    ("vip > 0", False),  # bool is not a number
    ("zero == false", False),
    ("currency < 5", False),
    ("amount <= $currency", False),
    ("tags == 'a'", False),  # lists never compare
    ("tags in ['a', 'b']", False),
    ("currency in $tags", False),
    ("customer in $owner", False),
]


@pytest.mark.parametrize(("text", "expected"), CONDITIONS)
def test_condition_semantics(text: str, expected: bool) -> None:
    assert compile_condition(text).matches(CTX) is expected


def test_list_membership_through_a_key() -> None:
    assert compile_condition("role in $allowed").matches({"role": "b", "allowed": ["a", "b"]})
    assert not compile_condition("role in $allowed").matches({"role": "c", "allowed": ["a", "b"]})


def test_condition_is_not_python() -> None:
    # Things Python (or simpleeval) would evaluate, refused by the grammar.
    for text in [
        "amount <= 50 and currency == 'EUR'",
        "amount <= 50 || vip == true",
        "not vip == true",
        "amount <= 25 * 2",
        "currency == 'EU' + 'R'",
        "currency.lower() == 'eur'",
        "amount <= 1e3",
        "amount <= 0x10",
        "amount <= 1_000",
        "currency == 'a\\'b'",
        "currency == {'a': 1}",
        "currency == ('EUR')",
        "amount <= 50 && ",
        "&& amount <= 50",
        "amount <= 50 amount <= 60",
        "amount <= 50 < 60",
        "currency in ['EUR',]",
        "currency in ['EUR' 'USD']",
        "currency in [['EUR']]",
        "currency in [$other]",
        "currency == [ 'EUR' ]",
        "$currency == 'EUR'",
        "in in ['a']",
        "true == amount",
        "amount == inf",
        "amount == nan",
        "amount <= 1234567890123456789",
    ]:
        with pytest.raises(ConditionError):
            compile_condition(text)


def test_condition_limits() -> None:
    compile_condition(" && ".join(["amount <= 1"] * 16))
    with pytest.raises(ConditionError, match="at most 16 clauses"):
        compile_condition(" && ".join(["amount <= 1"] * 17))
    with pytest.raises(ConditionError, match="at most 1024"):
        compile_condition("a == '" + "x" * 1100 + "'")


def test_condition_needs_a_mapping() -> None:
    with pytest.raises(TypeError):
        compile_condition("").matches([])  # type: ignore[arg-type]


def test_clause_text_and_description() -> None:
    condition = compile_condition("amount  <=  50&&currency == $want")
    assert [c.text for c in condition.clauses] == ["amount  <=  50", "currency == $want"]
    assert condition.clauses[1].describe({"currency": "EUR"}) == (
        "currency == $want  (currency = 'EUR', want = <missing>)"
    )


# -- patterns --------------------------------------------------------------------------------------

ACTIONS = [
    ("payments.refund", "payments.refund", True),
    ("payments.refund", "payments.refunds", False),
    ("payments.refund", "payments", False),
    ("payments.*", "payments.refund", True),
    ("payments.*", "payments.void", True),
    ("payments.*", "payments", False),
    ("payments.*", "payments.refund.partial", False),
    ("payments.*", "paymentsx.refund", False),
    ("payments.*", "other.payments.refund", False),
    ("a.b.*", "a.b.c", True),
    ("a.b.*", "a.c", False),
    ("*", "anything.at.all", True),
    ("*", "x", True),
]


@pytest.mark.parametrize(("pattern", "action", "expected"), ACTIONS)
def test_action_patterns(pattern: str, action: str, expected: bool) -> None:
    assert compile_action_pattern(pattern).matches(action) is expected


RESOURCES = [
    ("orders/*", "orders/o1", {}, True),
    ("orders/*", "orders", {}, False),
    ("orders/*", "orders/o1/items", {}, False),
    ("orders/*", "ordersx/o1", {}, False),
    ("orders/**", "orders/o1", {}, True),
    ("orders/**", "orders/o1/items/3", {}, True),
    ("orders/**", "orders", {}, False),
    ("**", "anything/at/all", {}, True),
    ("*", "one", {}, True),
    ("*", "one/two", {}, False),
    ("customers/{customer}/orders/*", "customers/c-1/orders/o1", {"customer": "c-1"}, True),
    ("customers/{customer}/orders/*", "customers/c-2/orders/o1", {"customer": "c-1"}, False),
    ("customers/{customer}/orders/*", "customers/c-1/orders/o1", {}, False),
    ("customers/{customer}", "customers/7", {"customer": 7}, True),
    ("customers/{customer}", "customers/", {"customer": ""}, False),
    ("a.b/c", "a.b/c", {}, True),
    ("a.b/c", "aXb/c", {}, False),  # '.' is a literal, not "any character"
    ("orders/o1", "orders/o1\n", {}, False),
    ("orders/*", "orders/", {}, False),
    ("orders/**", "orders/a//b", {}, False),
    ("orders/**", "orders/a/", {}, False),
]


@pytest.mark.parametrize(("pattern", "resource", "ctx", "expected"), RESOURCES)
def test_resource_patterns(pattern: str, resource: str, ctx: dict[str, Any], expected: bool) -> None:
    assert compile_resource_pattern(pattern).matches(resource, ctx) is expected


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        "/",
        "a/",
        "/a",
        "a//b",
        "a/./b",
        "a/../b",
        "..",
        "**/a",
        "a/**/b",
        "a*",
        "{a}b",
        "{A}",
        "{}",
        "a b",
        "a/b\n",
        "x" * 200,
        "/".join(["a"] * 17),
        "a/{ctx.key}",
    ],
)
def test_bad_resource_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_resource_pattern(pattern)


@pytest.mark.parametrize(
    "pattern", ["", "**", "*.x", "a.**", "a.", ".a", "A.b", "a..b", "a.b.c.d.*", "a.*.c", "a\n"]
)
def test_bad_action_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_action_pattern(pattern)
