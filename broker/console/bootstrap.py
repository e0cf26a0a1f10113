"""The console's bootstrap sign-in on embedded defaults, as Vault's dev mode prints a root token.

On embedded defaults (no operators and no operator issuers configured, the trial issuer on because
the broker runs on loopback without ``trust``), ``nhi-broker serve`` creates one credential each for
an admin, an approver (in every approver group of ``approvals.toml``) and an auditor, prints them
once to its terminal, and keeps only their SHA-256 in ``<data_dir>/console-bootstrap.json`` (mode
0600). Every start replaces them. They sign in to the console only, never to the admin API, and
only while the broker still runs on embedded defaults: a configured broker ignores a leftover file.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker.config import Settings
from broker.operators import Operator, hash_secret

__all__ = ["BOOTSTRAP_FILE", "BootstrapCredential", "BootstrapOperators", "bootstrap_enabled", "create_bootstrap"]

BOOTSTRAP_FILE = "console-bootstrap.json"
_ROLES = ("admin", "approver", "auditor")
_PREFIX = "nhi-console-"
_MAX_SECRET = 128


def bootstrap_enabled(settings: Settings) -> bool:
    """True on embedded defaults only: nobody configured as operator, and the trial issuer on by the
    loopback default (not by ``unsafe_trial_issuers``, not with ``trust``)."""
    return (not settings.operators and not settings.operator_issuers and settings.unsafe_trial_issuers is None
            and settings.trial_issuers_enabled)


@dataclass(frozen=True)
class BootstrapCredential:
    """One printed sign-in: the operator it stands for and its secret (never stored)."""

    operator: Operator
    secret: str


def create_bootstrap(data_dir: Path, approver_groups: tuple[str, ...]) -> list[BootstrapCredential]:
    """New credentials for an admin, an approver of ``approver_groups`` and an auditor; their hashes
    replace ``data_dir/console-bootstrap.json`` atomically (mode 0600). Returns them for printing."""
    created = []
    for role in _ROLES:
        groups = approver_groups if role == "approver" else ()
        operator = Operator(name=f"bootstrap-{role}", role=role, method="bootstrap", groups=groups)
        created.append(BootstrapCredential(operator, _PREFIX + secrets.token_urlsafe(32)))
    document = {"format": "nhi-broker-console-bootstrap", "version": 1, "operators": [
        {"name": c.operator.name, "role": c.operator.role, "groups": list(c.operator.groups),
         "token_sha256": hash_secret(c.secret)} for c in created]}
    path = data_dir / BOOTSTRAP_FILE
    tmp = path.with_name(path.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(document, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return created


class BootstrapOperators:
    """Checks a presented secret against the stored bootstrap hashes (when enabled)."""

    def __init__(self, settings: Settings) -> None:
        self._path = settings.data_dir / BOOTSTRAP_FILE
        self.enabled = bootstrap_enabled(settings)

    def authenticate(self, presented: str) -> Operator | None:
        """The bootstrap operator whose secret was presented, or ``None`` (disabled, absent, or no match).

        Reads the file each time (a restart replaces it); every stored hash is compared in constant time.
        """
        if not self.enabled or not presented.startswith(_PREFIX) or len(presented) > _MAX_SECRET:
            return None
        try:
            document = json.loads(self._path.read_text(encoding="utf-8"))
            rows = document["operators"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        digest = hash_secret(presented)
        found = None
        for row in rows if isinstance(rows, list) else []:
            with contextlib.suppress(KeyError, TypeError):
                if hmac.compare_digest(digest, str(row["token_sha256"])) and found is None \
                        and row["role"] in _ROLES:
                    found = Operator(name=str(row["name"]), role=str(row["role"]), method="bootstrap",
                                     groups=tuple(str(g) for g in row.get("groups", [])))
        return found
