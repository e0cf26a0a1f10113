"""Vault failures as broker errors, converted at one choke point (:func:`vault_errors`).

    TemporarilyUnavailable
    └── VaultUnavailable   503  unreachable, sealed, timing out, or failing inside
    AccessDenied
    └── VaultRefused       403  Vault answered and said no (names the Vault role, never a secret)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import hvac.exceptions as hvac_errors
import requests

from broker.errors import AccessDenied, TemporarilyUnavailable

__all__ = ["VaultRefused", "VaultUnavailable", "vault_errors"]

log = logging.getLogger("nhi_broker.vault")


class VaultUnavailable(TemporarilyUnavailable):
    """Vault could not be used (unreachable, sealed, erroring): nothing was issued."""


class VaultRefused(AccessDenied):
    """Vault refused the broker's request for a policy-allowed credential (a Vault-side setup problem)."""


_REFUSALS: tuple[tuple[type[Exception], str], ...] = (
    (hvac_errors.Forbidden, "permission denied"),
    (hvac_errors.Unauthorized, "the broker's Vault identity is not accepted"),
    (hvac_errors.InvalidPath, "no such path"),
    (hvac_errors.InvalidRequest, "invalid request"),
    (hvac_errors.UnsupportedOperation, "unsupported operation"),
    (hvac_errors.ParamValidationError, "invalid parameters"),
)


@contextmanager
def vault_errors(what: str) -> Iterator[None]:
    """Turn hvac/requests exceptions raised inside into :class:`VaultUnavailable` / :class:`VaultRefused`.

    ``what`` names the Vault object (``database role 'orders-reader'``); Vault's own error text is
    logged (it names paths and roles, not secrets) but not put on the wire.
    """
    try:
        yield
    except (VaultUnavailable, VaultRefused):
        raise
    except hvac_errors.VaultDown:
        raise VaultUnavailable(f"Vault is sealed ({what}); nothing was issued") from None
    except (requests.ConnectionError, requests.Timeout):
        raise VaultUnavailable(f"Vault is unreachable ({what}); nothing was issued") from None
    except hvac_errors.VaultError as exc:
        for kind, reason in _REFUSALS:
            if isinstance(exc, kind):
                log.warning("vault refused %s: %s %s", what, type(exc).__name__, getattr(exc, "errors", None))
                raise VaultRefused(f"Vault refused {what} ({reason})") from None
        log.warning("vault failed on %s: %s", what, type(exc).__name__)
        raise VaultUnavailable(f"Vault failed ({what}); nothing was issued") from None
    except requests.RequestException as exc:
        log.warning("vault request failed on %s: %s", what, type(exc).__name__)
        raise VaultUnavailable(f"Vault request failed ({what}); nothing was issued") from None
