"""Amounts of money: exact decimals in a currency's minor units (ISO 4217), never binary floats.

An intent that moves money says so in its context as ``amount`` (a JSON number) and ``currency``
(an ISO 4217 code). The rule, checked when the request is read (``broker.intent``) and again where a
budget is charged (``broker.state.guard``):

- ``amount`` is a JSON number greater than zero: not a string, boolean, list or object;
- ``currency`` is an active ISO 4217 code listed in :data:`CURRENCY_EXPONENTS`, and it is required
  with an ``amount``;
- the amount has no more decimals than the currency's minor unit allows (EUR and USD 2, JPY 0,
  KWD and BHD 3, CLF 4): ``10.005 EUR`` and ``10.5 JPY`` are refused, never rounded. Trailing zeros
  are not decimals: ``10.50 EUR`` and ``10.0 JPY`` are exact;
- it is at most :data:`MAX_MINOR_UNITS` minor units.

Amounts are compared and summed as exact decimals (:func:`exact_decimal`) and budgets count integer
minor units (:func:`to_minor_units`), so no rounding error can move a decision or exceed a budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

__all__ = [
    "CURRENCY_EXPONENTS",
    "MAX_MINOR_UNITS",
    "AmountError",
    "exact_decimal",
    "minor_units",
    "to_minor_units",
]

#: The most minor units one amount or budget may hold (10^15 cents is ten trillion euros).
MAX_MINOR_UNITS = 10**15

_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN BZD "
    "CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS "
    "GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL "
    "MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK "
    "PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS "
    "TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
)

#: ISO 4217 currency code -> number of decimals of its minor unit (the standard's "minor unit"
#: column; codes without one, such as XAU or XDR, are not accepted as money).
CURRENCY_EXPONENTS: Mapping[str, int] = MappingProxyType({
    code: exponent
    for exponent, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3), (4, _EXPONENT_4))
    for code in codes.split()
})


class AmountError(ValueError):
    """Why a value is not an exact amount of its currency (the message names what is wrong)."""


def exact_decimal(value: Any) -> Decimal | None:
    """The exact decimal a JSON number stands for; ``None`` for anything that is not a finite number.

    A float becomes the decimal of its shortest repr, which is the literal the client wrote: the
    intent parser (``broker.intent``) refuses literals that a double does not carry exactly.
    Booleans are not numbers.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if value == value and abs(value) != float("inf") else None
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    return None


def minor_units(amount: Decimal, currency: str) -> int:
    """``amount`` of ``currency`` as an integer count of its minor units, or :class:`AmountError`."""
    exponent = CURRENCY_EXPONENTS.get(currency)
    if exponent is None:
        raise AmountError(f"{currency[:8]!r} is not an ISO 4217 currency code with a minor unit")
    if amount <= 0:
        raise AmountError("must be greater than zero")
    minor = amount.scaleb(exponent)
    if minor != minor.to_integral_value():
        raise AmountError(f"has more decimals than {currency} allows ({exponent})")
    if minor > MAX_MINOR_UNITS:
        raise AmountError(f"is larger than {MAX_MINOR_UNITS} minor units")
    return int(minor)


def to_minor_units(value: Any, currency: str = "EUR") -> int | None:
    """``value`` (a JSON number, or a decimal string as TOML files write budgets) in minor units of
    ``currency``; ``None`` unless it is a positive amount with no more decimals than the currency has."""
    amount = exact_decimal(value)
    if amount is None and isinstance(value, str):
        try:
            amount = Decimal(value)
        except InvalidOperation:
            return None
        if not amount.is_finite():
            return None
    if amount is None:
        return None
    try:
        return minor_units(amount, currency)
    except AmountError:
        return None
