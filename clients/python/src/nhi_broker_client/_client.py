"""Chatbot-backend side: exchange a workload identity and an intent for a task token (RFC 8693 + RFC 9396),
sender-constrained with DPoP (RFC 9449), cached per intent until shortly before it expires.

The protocol logic lives in :class:`_Exchanger` (no I/O), shared by :class:`BrokerClient` and
:class:`AsyncBrokerClient`, which only move bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._dpop import DPoPKey
from ._errors import ApprovalPending, BrokerResponseError, TransportError, error_from_response
from ._intent import Intent
from ._trace import TraceparentSource, outgoing_traceparent, parse_traceresponse

__all__ = ["AsyncBrokerClient", "BrokerClient", "TaskToken"]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
CIBA = "urn:openid:params:grant-type:ciba"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
#: ``subject_token_type`` of X.509-SVID evidence: the token names the SPIFFE ID, the certificate is
#: presented in mutual TLS (``client_cert``) or forwarded by a trusted proxy.
X509_SVID_TOKEN_TYPE = "urn:nhi-broker:token-type:x509-svid"
_METADATA_PATH = "/.well-known/oauth-authorization-server"

IdentitySource = str | Callable[[], str]
AsyncIdentitySource = str | Callable[[], str] | Callable[[], Awaitable[str]]


@dataclass(frozen=True)
class TaskToken:
    """A task token for one intent at one audience, with the key it is bound to (if DPoP).

    ``receipt_index`` / ``receipt_leaf_hash`` locate its issuance entry in the broker's ledger;
    ``traceparent`` is the broker's span of the exchange (its ``traceresponse``), whose trace id the
    issuance entry records. ``repr()`` never shows the token.
    """

    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    audience: str
    intent: Intent
    receipt_index: int | None
    receipt_leaf_hash: str | None
    dpop_key: DPoPKey | None = field(default=None, repr=False)
    traceparent: str | None = None

    @property
    def trace_id(self) -> str | None:
        """The W3C trace id of the exchange (the one its ledger entry records), if the broker named it."""
        return self.traceparent.split("-")[1] if self.traceparent else None

    def headers(
        self, method: str, url: str, *, nonce: str | None = None, traceparent: TraceparentSource = None
    ) -> dict[str, str]:
        """``Authorization`` (and a fresh ``DPoP`` proof with ``ath``) for one request ``method url``,
        and a ``traceparent``: the one given, else the active OpenTelemetry span's, else the exchange's,
        so the downstream call sits in the trace that holds the token's decision and ledger entry."""
        if self.token_type.lower() == "dpop":
            assert self.dpop_key is not None
            proof = self.dpop_key.proof(method, url, access_token=self.access_token, nonce=nonce)
            headers = {"Authorization": f"DPoP {self.access_token}", "DPoP": proof}
        else:
            headers = {"Authorization": f"Bearer {self.access_token}"}
        parent = outgoing_traceparent(traceparent) or self.traceparent
        if parent is not None:
            headers["traceparent"] = parent
        return headers


class _Retry(Exception):
    """The broker asked for a DPoP nonce; try once more."""


class _StillPending(Exception):
    """CIBA ``authorization_pending`` or ``slow_down`` (``slower``): poll again after the interval."""

    def __init__(self, slower: bool) -> None:
        self.slower = slower


class _Exchanger:
    """The sans-I/O core: request building, response parsing, nonce and cache handling."""

    def __init__(self, broker_url: str, dpop_key: DPoPKey | None, refresh_margin: float,
                 clock: Callable[[], float], subject_token_type: str, traceparent: TraceparentSource = None) -> None:
        self.broker_url = broker_url.rstrip("/")
        self.traceparent = traceparent
        self.dpop_key = dpop_key
        self.refresh_margin = refresh_margin
        self.clock = clock
        self.subject_token_type = subject_token_type
        self.token_endpoint: str | None = None
        self.nonce: str | None = None
        self._cache: dict[str, TaskToken] = {}
        self._lock = threading.Lock()

    @staticmethod
    def cache_key(audience: str, intent: Intent) -> str:
        return json.dumps([audience, intent.to_json()], sort_keys=True, separators=(",", ":"))

    def cached(self, key: str) -> TaskToken | None:
        with self._lock:
            token = self._cache.get(key)
            if token is not None and token.expires_at - self.refresh_margin > self.clock():
                return token
            self._cache.pop(key, None)
            return None

    def store(self, key: str, token: TaskToken) -> None:
        with self._lock:
            now = self.clock()
            self._cache = {k: v for k, v in self._cache.items() if v.expires_at > now}
            self._cache[key] = token

    def metadata_url(self) -> str:
        return self.broker_url + _METADATA_PATH

    def read_metadata(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise TransportError(f"broker metadata answered HTTP {response.status_code}")
        try:
            meta = response.json()
        except ValueError:
            raise TransportError("broker metadata is not JSON") from None
        # RFC 8414 §3.3: the issuer in the metadata must be the one we asked.
        if not isinstance(meta, dict) or meta.get("issuer") != self.broker_url:
            raise TransportError("broker metadata names another issuer")
        endpoint = meta.get("token_endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise TransportError("broker metadata has no token endpoint")
        self.token_endpoint = endpoint

    def request(
        self, subject_token: str, audience: str, intent: Intent, *, actor_token: str | None = None,
        subject_token_type: str | None = None,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The token-exchange form. With ``actor_token`` (RFC 8693 §2.1) the workload is the actor (its
        identity keeps the workload's token type, e.g. an X.509-SVID) and ``subject_token`` the end
        user's token, or the parent task token of a sub-agent."""
        form = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": subject_token_type or self.subject_token_type,
            "audience": audience,
            "authorization_details": json.dumps([intent.to_json()]),
        }
        if actor_token is not None:
            form["actor_token"] = actor_token
            form["actor_token_type"] = self.subject_token_type
        return form, self._headers()

    def poll_request(self, subject_token: str, pending: ApprovalPending) -> tuple[dict[str, str], dict[str, str]]:
        """A CIBA poll: the held request's id and a fresh identity of this workload (docs/approvals.md)."""
        form = {
            "grant_type": CIBA,
            "auth_req_id": pending.auth_req_id,
            "subject_token": subject_token,
            "subject_token_type": self.subject_token_type,
        }
        return form, self._headers()

    def poll_response(self, response: httpx.Response, pending: ApprovalPending, first_try: bool) -> TaskToken:
        if response.status_code == 400:
            try:
                code = response.json().get("error")
            except (ValueError, AttributeError):
                code = None
            if code in ("authorization_pending", "slow_down"):
                raise _StillPending(slower=code == "slow_down")
        return self.response(response, pending.audience, pending.intent, first_try)

    def _headers(self) -> dict[str, str]:
        assert self.token_endpoint is not None
        headers = {"Accept": "application/json"}
        parent = outgoing_traceparent(self.traceparent)
        if parent is not None:
            headers["traceparent"] = parent
        if self.dpop_key is not None:
            headers["DPoP"] = self.dpop_key.proof("POST", self.token_endpoint, nonce=self.nonce, now=self.clock())
        return headers

    def response(self, response: httpx.Response, audience: str, intent: Intent, first_try: bool) -> TaskToken:
        if "DPoP-Nonce" in response.headers:
            self.nonce = response.headers["DPoP-Nonce"]
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            error = error_from_response(response.status_code, body)
            if error.code == "use_dpop_nonce" and first_try and self.dpop_key is not None:
                raise _Retry
            raise error
        if isinstance(body, dict) and isinstance(body.get("auth_req_id"), str) and "access_token" not in body:
            raise self._held(body, audience, intent)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise BrokerResponseError("invalid_response", "the broker's answer has no access_token", status=200)
        token_type = str(body.get("token_type", ""))
        expires_in = body.get("expires_in")
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
            raise BrokerResponseError("invalid_response", "the broker's answer has no valid expires_in", status=200)
        if self.dpop_key is not None and token_type.lower() != "dpop":
            # RFC 9449 §5: we asked for a bound token; a bearer token would be a silent downgrade.
            raise BrokerResponseError("invalid_response", "asked for a DPoP-bound token, got a bearer token",
                                      status=200)
        receipt = body.get("receipt")
        if not isinstance(receipt, dict):
            receipt = {}
        index, leaf = receipt.get("index"), receipt.get("leaf_hash")
        return TaskToken(
            access_token=body["access_token"],
            token_type=token_type,
            expires_at=self.clock() + expires_in,
            audience=audience,
            intent=intent,
            receipt_index=index if isinstance(index, int) and not isinstance(index, bool) else None,
            receipt_leaf_hash=leaf if isinstance(leaf, str) else None,
            dpop_key=self.dpop_key if token_type.lower() == "dpop" else None,
            traceparent=parse_traceresponse(response.headers.get("traceresponse")),
        )


    def _held(self, body: dict[str, Any], audience: str, intent: Intent) -> ApprovalPending:
        """The :class:`ApprovalPending` for a CIBA-style answer (raises if the answer is malformed)."""
        expires_in, interval = body.get("expires_in"), body.get("interval", 5)
        if not isinstance(expires_in, int) or isinstance(expires_in, bool) or expires_in <= 0:
            raise BrokerResponseError("invalid_response", "the broker held the intent without expires_in", status=200)
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            interval = 5
        rule_id = body.get("rule_id")
        return ApprovalPending(body["auth_req_id"], self.clock() + expires_in, float(interval),
                               rule_id if isinstance(rule_id, str) else None, audience, intent)


def _workload_identity(identity: Any, actor: Any) -> Any:
    if (identity is None) == (actor is None):
        raise TypeError("pass the workload identity once: as identity, or as actor (with user_token)")
    return identity if identity is not None else actor


def _tls_context(client_cert: tuple[str, str] | None, ca_file: str | None) -> ssl.SSLContext | bool:
    """The TLS settings of the client's own HTTP connection: system CAs unless ``ca_file``; a client
    certificate for mutual TLS (RFC 8705) when ``client_cert`` = ``(cert_file, key_file)``."""
    if client_cert is None and ca_file is None:
        return True
    context = ssl.create_default_context(cafile=ca_file)
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    return context


def _parent_token(parent: TaskToken | str) -> str:
    if isinstance(parent, TaskToken):
        if parent.token_type.lower() == "dpop":
            raise ValueError("a DPoP-bound task token cannot be handed to a sub-agent; ask for it with dpop=False")
        return parent.access_token
    if not isinstance(parent, str) or not parent:
        raise TypeError("parent must be a TaskToken or the parent's access token")
    return parent


def _intent(action: str, resource: str, context: Mapping[str, Any] | None) -> Intent:
    return Intent(action, resource, dict(context or {}))


class BrokerClient:
    """Exchanges this workload's identity for task tokens (synchronous).

    ``identity`` is the workload identity JWT, or a callable returning a fresh one per exchange
    (identity tokens are single use). Tokens are DPoP-bound to ``dpop_key`` (a fresh ES256 key by
    default; ``dpop=False`` asks for bearer tokens) and cached per (audience, intent) until
    ``refresh_margin`` seconds before they expire.

    To act for a verified end user (RFC 8693 delegation), pass the workload identity as ``actor``
    and the end user's token as ``user_token`` (a string or a callable, like ``identity``): tokens
    then have ``sub`` = the user and ``act.sub`` = this workload. :meth:`narrow` asks, as a
    sub-agent, for a token within a parent's task token.

    Mutual TLS (RFC 8705): ``client_cert`` = ``(cert_file, key_file)`` of the workload's X.509-SVID
    (leaf first, then intermediates) and ``ca_file`` the broker's server CA; with
    ``subject_token_type=X509_SVID_TOKEN_TYPE`` and ``identity`` = the SVID's SPIFFE ID the broker
    attests the certificate and binds the task token to it (``cnf.x5t#S256``). ``subject_token_type``
    is the workload identity's type, also when it is the ``actor``: an SVID-attested assistant acting
    for a verified user sends ``actor_token_type`` = the X.509-SVID type.

    Tracing (W3C Trace Context): each exchange sends ``traceparent`` (a string, or a callable asked
    per exchange, e.g. the current prompt's), else the active OpenTelemetry span's when
    ``opentelemetry-api`` is installed; :attr:`TaskToken.trace_id` is the trace the broker recorded.
    """

    def __init__(
        self,
        broker_url: str,
        identity: IdentitySource | None = None,
        *,
        actor: IdentitySource | None = None,
        user_token: IdentitySource | None = None,
        dpop: bool = True,
        dpop_key: DPoPKey | None = None,
        refresh_margin: float = 30.0,
        subject_token_type: str = JWT_TOKEN_TYPE,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | None = None,
        timeout: float = 10.0,
        client_cert: tuple[str, str] | None = None,
        ca_file: str | None = None,
        traceparent: TraceparentSource = None,
    ) -> None:
        key = (dpop_key or DPoPKey.generate()) if dpop else None
        self._core = _Exchanger(broker_url, key, refresh_margin, clock, subject_token_type, traceparent)
        self._identity: IdentitySource = _workload_identity(identity, actor)
        self._user_token = user_token
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout, verify=_tls_context(client_cert, ca_file))

    @property
    def dpop_key(self) -> DPoPKey | None:
        """The key task tokens are bound to."""
        return self._core.dpop_key

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_token(
        self, audience: str, action: str, resource: str, context: Mapping[str, Any] | None = None,
        *, fresh: bool = False, wait_for_approval: bool | float = False,
    ) -> TaskToken:
        """A task token for this intent at ``audience``: from the cache, or a new exchange (``fresh=True``
        forces one). Raises a :class:`~nhi_broker_client.BrokerResponseError` subclass or
        :class:`~nhi_broker_client.TransportError`.

        When a review rule holds the intent for a person's approval, raises
        :class:`~nhi_broker_client.ApprovalPending`; with ``wait_for_approval`` (``True``, or at most
        that many seconds) it polls until someone decided instead (see :meth:`wait_for_approval`).
        """
        intent = _intent(action, resource, context)
        key = _Exchanger.cache_key(audience, intent)
        if not fresh and (cached := self._core.cached(key)) is not None:
            return cached
        try:
            token = self._exchange(audience, intent)
        except ApprovalPending as pending:
            if wait_for_approval is False:
                raise
            limit = None if wait_for_approval is True else float(wait_for_approval)
            token = self.wait_for_approval(pending, timeout=limit)
        self._core.store(key, token)
        return token

    def collect(self, pending: ApprovalPending) -> TaskToken:
        """Poll once for a held intent (CIBA poll mode) with a fresh identity token.

        Returns the token once approved; raises ``pending`` again while nobody decided (its
        ``interval`` grows on ``slow_down``), :class:`~nhi_broker_client.AccessDeniedError` when
        denied, :class:`~nhi_broker_client.ApprovalExpiredError` when nobody decided in time. Each
        poll spends one identity token, so ``identity`` must be a callable for polling.
        """
        subject_token = self._identity() if callable(self._identity) else self._identity
        for first_try in (True, False):
            form, headers = self._core.poll_request(subject_token, pending)
            assert self._core.token_endpoint is not None
            response = self._send("POST", self._core.token_endpoint, data=form, headers=headers)
            try:
                return self._core.poll_response(response, pending, first_try)
            except _Retry:
                continue
            except _StillPending as still:
                if still.slower:
                    pending.interval += 5  # RFC 8628 §3.5 / CIBA §11: slow down by 5 s
                raise pending from None
        raise AssertionError("unreachable")

    def wait_for_approval(self, pending: ApprovalPending, *, timeout: float | None = None) -> TaskToken:
        """Poll every ``pending.interval`` seconds until the intent is approved (the token), denied or
        expired (the typed error), or ``timeout`` seconds passed (``pending`` is raised again)."""
        deadline = pending.expires_at if timeout is None else min(pending.expires_at, self._core.clock() + timeout)
        while True:
            time.sleep(min(pending.interval, max(0.0, deadline - self._core.clock())))
            try:
                return self.collect(pending)
            except ApprovalPending:
                if self._core.clock() >= deadline:
                    raise

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach the broker: {type(exc).__name__}") from None

    def narrow(
        self, parent: TaskToken | str, audience: str, action: str, resource: str,
        context: Mapping[str, Any] | None = None,
    ) -> TaskToken:
        """As a sub-agent: a new task token within ``parent`` (the parent's token, handed to this
        workload). The broker refuses anything wider with ``invalid_target``; never cached."""
        return self._exchange(audience, _intent(action, resource, context), parent=_parent_token(parent))

    def _exchange(self, audience: str, intent: Intent, parent: str | None = None) -> TaskToken:
        if self._core.token_endpoint is None:
            self._core.read_metadata(self._send("GET", self._core.metadata_url()))
        workload = self._identity() if callable(self._identity) else self._identity
        user = self._user_token() if callable(self._user_token) else self._user_token
        subject_token, actor_token, subject_type = workload, None, None
        if parent is not None:
            subject_token, actor_token, subject_type = parent, workload, ACCESS_TOKEN_TYPE
        elif user is not None:
            subject_token, actor_token, subject_type = user, workload, JWT_TOKEN_TYPE
        for first_try in (True, False):
            form, headers = self._core.request(subject_token, audience, intent, actor_token=actor_token,
                                               subject_token_type=subject_type)
            assert self._core.token_endpoint is not None
            response = self._send("POST", self._core.token_endpoint, data=form, headers=headers)
            try:
                return self._core.response(response, audience, intent, first_try)
            except _Retry:
                # use_dpop_nonce is answered before the identity is checked, so it is not yet spent.
                continue
        raise AssertionError("unreachable")


class AsyncBrokerClient:
    """The asyncio twin of :class:`BrokerClient`; ``identity`` may also be an async callable."""

    def __init__(
        self,
        broker_url: str,
        identity: AsyncIdentitySource | None = None,
        *,
        actor: AsyncIdentitySource | None = None,
        user_token: AsyncIdentitySource | None = None,
        dpop: bool = True,
        dpop_key: DPoPKey | None = None,
        refresh_margin: float = 30.0,
        subject_token_type: str = JWT_TOKEN_TYPE,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        client_cert: tuple[str, str] | None = None,
        ca_file: str | None = None,
        traceparent: TraceparentSource = None,
    ) -> None:
        key = (dpop_key or DPoPKey.generate()) if dpop else None
        self._core = _Exchanger(broker_url, key, refresh_margin, clock, subject_token_type, traceparent)
        self._identity: AsyncIdentitySource = _workload_identity(identity, actor)
        self._user_token = user_token
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout, verify=_tls_context(client_cert, ca_file))

    @property
    def dpop_key(self) -> DPoPKey | None:
        """The key task tokens are bound to."""
        return self._core.dpop_key

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def get_token(
        self, audience: str, action: str, resource: str, context: Mapping[str, Any] | None = None,
        *, fresh: bool = False, wait_for_approval: bool | float = False,
    ) -> TaskToken:
        """See :meth:`BrokerClient.get_token`."""
        intent = _intent(action, resource, context)
        key = _Exchanger.cache_key(audience, intent)
        if not fresh and (cached := self._core.cached(key)) is not None:
            return cached
        try:
            token = await self._exchange(audience, intent)
        except ApprovalPending as pending:
            if wait_for_approval is False:
                raise
            limit = None if wait_for_approval is True else float(wait_for_approval)
            token = await self.wait_for_approval(pending, timeout=limit)
        self._core.store(key, token)
        return token

    async def collect(self, pending: ApprovalPending) -> TaskToken:
        """See :meth:`BrokerClient.collect`."""
        subject_token = await self._subject_token()
        for first_try in (True, False):
            form, headers = self._core.poll_request(subject_token, pending)
            assert self._core.token_endpoint is not None
            response = await self._send("POST", self._core.token_endpoint, data=form, headers=headers)
            try:
                return self._core.poll_response(response, pending, first_try)
            except _Retry:
                continue
            except _StillPending as still:
                if still.slower:
                    pending.interval += 5
                raise pending from None
        raise AssertionError("unreachable")

    async def wait_for_approval(self, pending: ApprovalPending, *, timeout: float | None = None) -> TaskToken:
        """See :meth:`BrokerClient.wait_for_approval`."""
        deadline = pending.expires_at if timeout is None else min(pending.expires_at, self._core.clock() + timeout)
        while True:
            await asyncio.sleep(min(pending.interval, max(0.0, deadline - self._core.clock())))
            try:
                return await self.collect(pending)
            except ApprovalPending:
                if self._core.clock() >= deadline:
                    raise

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"cannot reach the broker: {type(exc).__name__}") from None

    async def _subject_token(self) -> str:
        return await _resolve(self._identity)

    async def narrow(
        self, parent: TaskToken | str, audience: str, action: str, resource: str,
        context: Mapping[str, Any] | None = None,
    ) -> TaskToken:
        """See :meth:`BrokerClient.narrow`."""
        return await self._exchange(audience, _intent(action, resource, context), parent=_parent_token(parent))

    async def _exchange(self, audience: str, intent: Intent, parent: str | None = None) -> TaskToken:
        if self._core.token_endpoint is None:
            self._core.read_metadata(await self._send("GET", self._core.metadata_url()))
        workload = await self._subject_token()
        user = None if self._user_token is None else await _resolve(self._user_token)
        subject_token, actor_token, subject_type = workload, None, None
        if parent is not None:
            subject_token, actor_token, subject_type = parent, workload, ACCESS_TOKEN_TYPE
        elif user is not None:
            subject_token, actor_token, subject_type = user, workload, JWT_TOKEN_TYPE
        for first_try in (True, False):
            form, headers = self._core.request(subject_token, audience, intent, actor_token=actor_token,
                                               subject_token_type=subject_type)
            assert self._core.token_endpoint is not None
            response = await self._send("POST", self._core.token_endpoint, data=form, headers=headers)
            try:
                return self._core.response(response, audience, intent, first_try)
            except _Retry:
                continue
        raise AssertionError("unreachable")


async def _resolve(source: AsyncIdentitySource) -> str:
    if not callable(source):
        return source
    value = source()
    return await value if inspect.isawaitable(value) else value
