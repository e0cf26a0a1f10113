"""The shared-state services of one broker process, built on a :class:`~broker.state.store.StateStore`.

- :class:`~broker.state.tokens.TokenState`: revocation (one token, or every token of a workload, an end
  user or a conversation), suspension (kill switch) and use counts of N-use tokens;
- :class:`~broker.state.guard.IssuanceGuard`: suspension, request rates and value budgets at issuance;
- :class:`~broker.state.introspection.Introspector`: RFC 7662 introspection and RFC 7009 revocation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from broker.attest.verifier import Attestor
from broker.clock import Clock
from broker.mint.jwt import JWT_TOKEN_TYPE
from broker.mint.keys import KeySet
from broker.operators import ClientAuthenticator, OperatorAuthenticator
from broker.state.guard import IssuanceGuard
from broker.state.introspection import Introspector
from broker.state.store import StateStore
from broker.state.tokens import TokenState

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.ledger.log import Ledger

__all__ = ["StateServices"]


@dataclass(frozen=True)
class StateServices:
    """The shared-state services of one broker process, and who may use them."""

    tokens: TokenState
    guard: IssuanceGuard
    introspector: Introspector
    operators: OperatorAuthenticator
    clients: ClientAuthenticator
    on_close: tuple[Callable[[], None], ...] = ()

    @classmethod
    def build(
        cls, store: StateStore, keys: KeySet, issuer: str, clock: Clock,
        operators: OperatorAuthenticator, clients: ClientAuthenticator,
        on_close: tuple[Callable[[], None], ...] = (), ledger: Ledger | None = None,
    ) -> StateServices:
        """Assemble the services over ``store``; ``ledger`` appends issuance entries with the admission
        checks when its storage process holds ``store``'s file too (:class:`IssuanceGuard`)."""
        tokens = TokenState(store, clock)
        return cls(
            tokens=tokens,
            guard=IssuanceGuard(store, tokens, clock, ledger=ledger),
            introspector=Introspector(keys, issuer, tokens, clock),
            operators=operators,
            clients=clients,
            on_close=on_close,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, store: StateStore, keys: KeySet, attestor: Attestor, clock: Clock,
        ledger: Ledger | None = None,
    ) -> StateServices:
        """The services as ``settings`` configure them; ``attestor`` verifies resource servers' identities."""
        # Operators' issuers get their own attestor: an operator's OIDC token never exchanges for a task token.
        op_attestor = Attestor(settings.operator_issuers, store, clock) if settings.operator_issuers else None
        op_attest = partial(op_attestor.verify, subject_token_type=JWT_TOKEN_TYPE) if op_attestor else None
        operators = OperatorAuthenticator(settings.operators, attest=op_attest)
        clients = ClientAuthenticator(
            settings.introspection_clients, attest=partial(attestor.verify, subject_token_type=JWT_TOKEN_TYPE)
        )
        return cls.build(store, keys, settings.issuer_url, clock, operators, clients,
                         on_close=(op_attestor.close,) if op_attestor else (), ledger=ledger)

    def close(self) -> None:
        """Release what the services own (the operators' attestor and its key fetchers)."""
        for close in self.on_close:
            close()
