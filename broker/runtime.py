"""Wiring: builds the broker's components from :class:`~broker.config.Settings`.

Everything on the embedded default lives under ``settings.data_dir``::

    keys/token/*.pem        ES256 (or EdDSA) task-token signing keys, mode 0600
    keys/ledger-key.pem     Ed25519 signed-note key of the ledger, mode 0600
    dev-issuer-key.pem      trial-only workload-identity issuer (when enabled)
    dev-user-issuer-key.pem trial-only end-user issuer (when enabled)
    state.sqlite3           shared state on the embedded default (state_backend = "sqlite"):
                            single-use values, revocations, suspensions, use counts, rates, budgets
    vault-leases.sqlite3    Vault leases handed out (when [vault] is configured), unless the ledger is
                            in PostgreSQL: then the lease book is there too, shared by every replica
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import heap
from broker.approvals import ApprovalDesk, WebhookNotifier
from broker.attest.dev import DevIssuer, DevUserIssuer
from broker.attest.jwks import JwksSource
from broker.attest.methods.wimse import WimseMethod
from broker.attest.methods.x509_svid import X509SvidMethod
from broker.attest.users import UserTokenVerifier
from broker.attest.verifier import Attestor
from broker.clock import Clock, SystemClock
from broker.config import Settings
from broker.delegation import ParentTokens
from broker.dpop import DPoPVerifier, NonceIssuer
from broker.entries import key_rotation_entry, policy_load_entry
from broker.errors import ConfigError, PolicyLoadError, StoreUnavailable, TemporarilyUnavailable
from broker.isolation import Lanes
from broker.ledger import Ledger, NoteSigner
from broker.ledger.engines import is_shared, open_ledger_storage
from broker.ledger.storage import LedgerStorage
from broker.mint.jwt import TaskTokenMinter
from broker.mint.keys import KeySet, PrivateKey, _load, load_or_create_private_key, public_jwk
from broker.pipeline import Broker
from broker.policy import PolicySet, load_policies
from broker.reload import PolicyReloader, ReloadOutcome, policy_file_digests
from broker.state import StateStore, open_store
from broker.state.remote import RemoteStateStore
from broker.state.services import StateServices
from broker.storaged.processes import sockets_from_environment
from broker.telemetry import NO_SPANS, Spans
from broker.vault.issuer import VaultIssuer
from broker.vault.wiring import open_vault_issuer

__all__ = ["Runtime", "policy_file_digests"]

log = logging.getLogger("nhi_broker")


@dataclass
class Runtime:
    """The assembled components of one broker process."""

    settings: Settings
    clock: Clock
    keys: KeySet
    ledger: Ledger
    store: StateStore
    policies: PolicySet
    attestor: Attestor
    minter: TaskTokenMinter
    broker: Broker
    dev_issuer: DevIssuer | None
    ledger_signer: NoteSigner | None = None
    ledger_signer_key: PrivateKey | None = None
    ledger_key_created: bool = False
    dpop: DPoPVerifier | None = None
    state: StateServices | None = None
    vault: VaultIssuer | None = None
    approvals: ApprovalDesk | None = None
    users: UserTokenVerifier | None = None
    dev_user_issuer: DevUserIssuer | None = None
    #: The configured X.509-SVID method: the app refreshes its bundles from a worker thread.
    x509: X509SvidMethod | None = None
    #: Where the exchange's steps are traced (broker.telemetry).
    spans: Spans = NO_SPANS
    #: Live policy reloads: leads them here, follows the ones other workers and replicas lead.
    reloads: PolicyReloader | None = None
    #: (inode, mtime) of the ledger key file when its key was loaded: a rotated key is taken up live.
    ledger_key_stamp: tuple[int, int] | None = None
    #: Threads and deadlines of the blocking backends without a lane of their own (ledger reads).
    lanes: Lanes = field(default_factory=Lanes.create)

    @classmethod
    def open(cls, settings: Settings, clock: Clock | None = None, *, spans: Spans = NO_SPANS) -> Runtime:
        """Create or reuse everything under ``settings.data_dir`` and assemble the broker.

        ``spans`` traces the exchange's steps (:mod:`broker.telemetry`; the app passes OpenTelemetry's
        when ``otlp_endpoint`` is set)."""
        clock = clock or SystemClock()
        data_dir = settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        policies = load_policies(settings.policies_dir)
        keys = KeySet(data_dir / "keys" / "token", alg=settings.token_alg, clock=clock)
        storage = open_ledger_storage(settings.ledger_storage_url)
        try:
            ledger_key, ledger_key_created = _ledger_key(settings, storage)
            signer = NoteSigner(settings.ledger_key_name or settings.ledger_origin, ledger_key)  # type: ignore[arg-type]
        except BaseException:
            storage.close()
            raise
        # Opening checks integrity: a corrupt, cut-short or rewritten ledger stops the start, loudly.
        ledger = Ledger(storage, signer, settings.ledger_origin, clock)
        # Under `nhi-broker serve` with several workers, one storage process writes the embedded SQLite
        # files for all of them (broker.storaged); otherwise this process's own threads do. Holding
        # both, it admits an exchange and appends its issuance entry in one call.
        sockets = sockets_from_environment()
        remote_state = "state" in sockets and settings.state_backend == "sqlite"
        if "ledger" in sockets:
            ledger.append_through(sockets["ledger"], with_state=remote_state and sockets["state"] == sockets["ledger"])
        store: StateStore
        if remote_state:
            store = RemoteStateStore(sockets["state"], clock)
        else:
            store = open_store(settings, clock)
        issuers = list(settings.trust)
        dev_issuer = None
        sources = {}
        if settings.trial_issuers_enabled:
            dev_issuer = DevIssuer.load_or_create(data_dir)
            issuers.append(dev_issuer.issuer_config(settings.audience))
            sources[dev_issuer.issuer] = dev_issuer.jwks_source()
        x509 = X509SvidMethod.configured(settings.x509, clock) if settings.x509 is not None else None
        wimse = (WimseMethod.configured(settings.wimse, store, clock, settings.token_endpoint)
                 if settings.wimse is not None else None)
        request_methods = [method for method in (x509, wimse) if method is not None]
        attestor = Attestor(
            issuers, store, clock, max_token_bytes=settings.max_subject_token_bytes, jwks_sources=sources,
            request_methods=request_methods,
        )
        user_issuers = list(settings.user_issuers)
        dev_user_issuer = None
        user_sources: dict[str, JwksSource] = {}
        if settings.trial_user_issuer_enabled:
            dev_user_issuer = DevUserIssuer.load_or_create(data_dir)
            user_issuers.append(dev_user_issuer.user_issuer_config(settings.audience))
            user_sources[dev_user_issuer.issuer] = dev_user_issuer.jwks_source()
        users = UserTokenVerifier(
            user_issuers, store, clock, max_token_bytes=settings.max_subject_token_bytes, key_sources=user_sources
        ) if user_issuers else None
        minter = TaskTokenMinter(keys, settings.issuer_url, default_ttl=settings.token_ttl, clock=clock)
        state = StateServices.from_settings(settings, store, keys, attestor, clock, ledger=ledger)
        parents = ParentTokens(keys, settings.issuer_url, state.tokens, clock)
        shared = settings.ledger_storage_url if is_shared(settings.ledger_storage_url) else None
        vault = (open_vault_issuer(settings.vault, data_dir, ledger, clock, shared,
                                   suspended_since=state.tokens.suspended_since, spans=spans)
                 if settings.vault else None)
        approvals = ApprovalDesk(store, ledger, clock, poll_interval=settings.approvals.poll_interval,
                                 notify=_webhook(settings, clock))
        nonces = None
        if settings.dpop_nonce:
            # Every worker derives the same nonce key from one key file (created once, mode 0600).
            nonce_key, _ = load_or_create_private_key(data_dir / "keys" / "dpop-nonce-key.pem", "EdDSA")
            nonces = NonceIssuer(nonce_key.private_bytes_raw())  # type: ignore[union-attr]
        dpop = DPoPVerifier(store, clock, nonces=nonces)
        # Decisions run on the event loop; the store is async (broker.state.store), never blocking it.
        broker = Broker(
            attestor, policies, minter, ledger, state.guard, clock, vault=vault, approvals=approvals,
            users=users, parents=parents, dpop=dpop, spans=spans,
        )
        runtime = cls(
            settings=settings, clock=clock, keys=keys, ledger=ledger, store=store, policies=policies,
            attestor=attestor, minter=minter, broker=broker, dev_issuer=dev_issuer,
            ledger_signer=signer, ledger_signer_key=ledger_key, ledger_key_created=ledger_key_created,
            dpop=dpop,
            state=state,
            vault=vault,
            approvals=approvals,
            users=users,
            dev_user_issuer=dev_user_issuer,
            x509=x509,
            spans=spans,
            ledger_key_stamp=_stamp(data_dir / "keys" / "ledger-key.pem"),
            lanes=Lanes.create(ledger_capacity=settings.ledger_read_threads,
                               ledger_timeout=settings.ledger_read_timeout),
        )
        runtime.reloads = PolicyReloader(settings.policies_dir, lambda: runtime.policies, runtime.install_policies,
                                         ledger, store, clock)
        return runtime

    def install_policies(self, policies: PolicySet) -> None:
        """Serve ``policies`` from now on: one assignment each, so a request sees one set or the other.

        The replaced set may have been frozen at start-up (:mod:`broker.heap`): released, so the
        collector reclaims it."""
        self.broker.policies = policies
        self.policies = policies
        heap.release()

    async def reload_policies(self, trigger: str, actor: dict[str, Any] | None = None) -> ReloadOutcome:
        """Lint, swap and record the policy directory's set (:mod:`broker.reload`); raises
        :class:`~broker.errors.PolicyLoadError` (the old set keeps serving) when it is refused."""
        assert self.reloads is not None
        return await self.reloads.reload(f"reload-{trigger}-{uuid.uuid4().hex}", actor)

    def refresh_keys(self) -> list[str]:
        """Take up rotated keys without a restart (blocking file reads: call it from a thread).

        New token-key files join the JWKS at once and sign from their ``signs_from`` time; a replaced
        ledger key file signs the next checkpoints. Returns what changed, for the log.
        """
        changed = [f"task-token key {k.kid} published, signs from {k.signs_from}" for k in self.keys.refresh()]
        path = self.settings.data_dir / "keys" / "ledger-key.pem"
        stamp = _stamp(path)
        if stamp is not None and stamp != self.ledger_key_stamp and self.ledger_signer is not None:
            self.ledger_key_stamp = stamp  # a file that cannot be used is reported once, not at every look
            key = _load(path, "EdDSA")
            if self.ledger_signer_key is None or public_jwk(key)["kid"] != public_jwk(self.ledger_signer_key)["kid"]:
                signer = NoteSigner(self.settings.ledger_key_name or self.settings.ledger_origin, key)  # type: ignore[arg-type]
                self.ledger.replace_signer(signer)
                self.ledger_signer, self.ledger_signer_key = signer, key
                changed.append(f"ledger key now {signer.verifier_key}")
        return changed

    async def run_live_sync(self, interval: float) -> None:
        """Every ``interval`` seconds: follow policy reloads led elsewhere, take up rotated keys."""
        if self.reloads is not None:
            try:
                await self.reloads.check_started()
            except (TemporarilyUnavailable, PolicyLoadError) as exc:
                log.warning("policy set at start not checked against the shared record: %s", exc)
        while True:
            await asyncio.sleep(interval)
            try:
                if self.reloads is not None:
                    await self.reloads.follow()
                for change in await asyncio.to_thread(self.refresh_keys):
                    log.info("live change: %s", change)
            except StoreUnavailable:
                continue  # requests fail closed meanwhile; the next look tries again
            except Exception:
                log.exception("live sync failed; trying again in %.1f s", interval)

    @property
    def ledger_verifier_key(self) -> str:
        """The ledger's signed-note verifier key, ``<name>+<keyid>+<base64>``."""
        assert self.ledger_signer is not None
        return str(self.ledger_signer.verifier_key)

    def record_new_keys(self, request_id: str) -> list[str]:
        """``key_rotation`` entries for the keys this process created; returns their purposes."""
        now = self.clock.now()
        recorded = []
        if self.ledger_key_created and self.ledger_signer_key is not None:
            jwk = public_jwk(self.ledger_signer_key)
            entry = key_rotation_entry(
                now=now, request_id=request_id, purpose="ledger", kid=jwk["kid"], alg="EdDSA", jwk=jwk
            )
            self.ledger.append(entry)
            recorded.append("ledger")
        if self.keys.created:
            active = self.keys.active
            entry = key_rotation_entry(
                now=now, request_id=request_id, purpose="task-token", kid=active.kid, alg=active.alg, jwk=active.jwk
            )
            self.ledger.append(entry)
            recorded.append("task-token")
        return recorded

    def record_startup(self) -> None:
        """Ledger entries for what went live at this start: new keys and the policy set."""
        now = self.clock.now()
        start_id = f"start-{uuid.uuid4().hex}"
        self.record_new_keys(start_id)
        receipt = self.ledger.append(
            policy_load_entry(
                now=now,
                request_id=start_id,
                policy_version=self.policies.version,
                files=policy_file_digests(self.settings.policies_dir),
                source=str(self.settings.policies_dir),
            )
        )
        # Workers (and replicas) compare the set they serve with this record (broker.reload).
        if self.reloads is not None:
            try:
                asyncio.run(self.reloads.announce(self.policies.version, receipt))
            except TemporarilyUnavailable as exc:  # the store is down, or a crashed reload's lock still holds
                log.warning("the started policy set is not announced in the state store (%s): "
                            "workers follow reloads once it answers", exc)

    def _close_sync_parts(self) -> None:
        self.lanes.close()
        if self.vault is not None:
            self.vault.close()
        self.attestor.close()
        if self.users is not None:
            self.users.close()
        if self.state is not None:
            self.state.close()
        self.ledger.close()

    async def aclose(self) -> None:
        """Stop the ledger writer and release connections, from the event loop (the lifespan)."""
        await self.store.close()
        # Joining the ledger writer and the Vault sweeper waits for their current work: off the loop.
        await asyncio.to_thread(self._close_sync_parts)

    def close(self) -> None:
        """:meth:`aclose` for synchronous code (the CLI, tests); never call it on an event loop."""
        asyncio.run(self.store.close())
        self._close_sync_parts()


def _ledger_key(settings: Settings, storage: LedgerStorage) -> tuple[PrivateKey, bool]:
    """The ledger's signing key; on a shared ledger, created only while that ledger is still empty.

    Every replica must sign with the same key (one origin, one key: an auditor would otherwise see
    two signers of one log). A replica without the key file joining a ledger that already has entries
    is refused instead of minting a second key.
    """
    path = settings.data_dir / "keys" / "ledger-key.pem"
    if is_shared(settings.ledger_storage_url) and not path.is_file():
        size = storage.size()
        if size > 0:
            raise ConfigError(
                f"the shared ledger already holds {size} entries but {path} does not exist: every replica "
                "must sign with the same ledger key (copy keys/ledger-key.pem from an existing replica)"
            )
    return load_or_create_private_key(path, "EdDSA")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _webhook(settings: Settings, clock: Clock) -> WebhookNotifier | None:
    cfg = settings.approvals
    if cfg.webhook_url is None or cfg.webhook_secret is None:
        return None
    secret = cfg.webhook_secret.get_secret_value().encode("utf-8")
    return WebhookNotifier(cfg.webhook_url, secret, clock, console_url=settings.issuer_url)
