"""A running broker's ledger read API as a :class:`~broker.audit.source.LedgerSource`.

Entries are fetched in pages of :data:`~broker.audit.source.ENTRIES_PAGE`, a few pages ahead on
worker threads so that the network and the hashing overlap. When a page cannot be fetched, the
page is split in halves until the single entry the log does not serve is found: an auditor needs
the index, not "page 812 failed".
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx

from broker.audit.errors import AuditFailure, SourceUnavailable
from broker.audit.source import ENTRIES_PAGE, RawEntry

__all__ = ["HttpLedgerSource"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_PREFETCH = 3


class _EntryRefused(Exception):
    """The log answered a request for entries with an error status (not a transport failure)."""

    def __init__(self, start: int, detail: str) -> None:
        super().__init__(detail)
        self.start = start
        self.detail = detail


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _describe_error(response: httpx.Response) -> str:
    detail = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return detail
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        detail += f" {body['error']}"
        if isinstance(body.get("error_description"), str):
            detail += f": {body['error_description'][:200]}"
    return detail


class HttpLedgerSource:
    """The ledger of the broker at ``base_url`` (``http(s)://host[:port][/prefix]``).

    ``client`` may be injected (tests, proxies, custom TLS); it is closed by :meth:`close` only
    when this object created it.
    """

    def __init__(self, base_url: str, *, client: httpx.Client | None = None, timeout: float = 30.0) -> None:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", base_url):
            raise ValueError("the ledger URL must be an http(s) URL without query or fragment")
        self._base = base_url.rstrip("/")
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=timeout, follow_redirects=False)

    @property
    def description(self) -> str:
        return self._base

    # -- transport ---------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        """GET with transport errors turned into :class:`SourceUnavailable` (the one choke point)."""
        try:
            return self._client.get(self._base + path, params=params)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(f"{self._base}{path}: {type(exc).__name__}: {exc}") from None

    def _get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        response = self._get(path, params)
        if response.status_code != 200:
            raise SourceUnavailable(f"{self._base}{path}: {_describe_error(response)}")
        try:
            return response.json()
        except ValueError:
            raise SourceUnavailable(f"{self._base}{path}: the answer is not JSON") from None

    # -- LedgerSource --------------------------------------------------------------------------

    def checkpoint(self) -> str:
        response = self._get("/v1/ledger/checkpoint")
        if response.status_code != 200:
            raise SourceUnavailable(f"{self._base}/v1/ledger/checkpoint: {_describe_error(response)}")
        return response.text

    def verifier_key(self) -> str | None:
        """The verifier key the broker *advertises* (RFC 8414 metadata). Never trust it for
        verification: an auditor takes the key out of band; this is for export bundles only."""
        try:
            meta = self._get_json("/.well-known/oauth-authorization-server")
        except SourceUnavailable:
            return None
        key = meta.get("ledger_verifier_key") if isinstance(meta, dict) else None
        return key if isinstance(key, str) else None

    def _page(self, start: int, end: int) -> list[RawEntry]:
        """One request for ``[start, end)``; the log may answer fewer entries, never others."""
        response = self._get("/v1/ledger/entries", {"start": start, "end": end})
        if response.status_code != 200:
            raise _EntryRefused(start, _describe_error(response))
        try:
            body = response.json()
            items = body["entries"]
            if not isinstance(items, list) or len(items) > end - start:
                raise ValueError("'entries' is not a list of the requested length")
            page = []
            for offset, item in enumerate(items):
                index = start + offset
                if item.get("index") != index:
                    raise ValueError(f"entry {offset} of the page is labelled {item.get('index')!r}, not {index}")
                recorded = item.get("leaf_hash")
                if not isinstance(recorded, str) or not _HEX64.fullmatch(recorded):
                    raise ValueError(f"entry {index} has no leaf_hash of 64 lower-case hex digits")
                page.append(RawEntry(index, _b64(item.get("leaf"), f"leaf of entry {index}"), bytes.fromhex(recorded)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditFailure(f"the log's entries answer is malformed: {exc}", index=start) from None
        return page

    def _fetch(self, start: int, end: int) -> list[RawEntry]:
        """All of ``[start, end)``, following short answers; :class:`_EntryRefused` on an error."""
        out: list[RawEntry] = []
        position = start
        while position < end:
            page = self._page(position, end)
            if not page:
                raise _EntryRefused(position, "the log answered no entries")
            out.extend(page)
            position += len(page)
        return out

    def _locate(self, start: int, end: int, detail: str) -> AuditFailure:
        """Split ``[start, end)`` until the first entry the log refuses to serve is found."""
        lo, hi = start, end
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                self._fetch(lo, mid)
            except _EntryRefused as exc:
                hi, detail = mid, exc.detail
                continue
            lo = mid
        return AuditFailure(f"the log does not serve this entry ({detail})", index=lo)

    def entries(self, start: int, end: int) -> Iterator[RawEntry]:
        pages = [(a, min(a + ENTRIES_PAGE, end)) for a in range(start, end, ENTRIES_PAGE)]
        if not pages:
            return
        with ThreadPoolExecutor(max_workers=_PREFETCH, thread_name_prefix="ledger-fetch") as pool:
            pending: deque[tuple[int, int, Future[list[RawEntry]]]] = deque()
            try:
                for a, b in pages[:_PREFETCH]:
                    pending.append((a, b, pool.submit(self._fetch, a, b)))
                queued = iter(pages[_PREFETCH:])
                while pending:
                    a, b, future = pending.popleft()
                    try:
                        page = future.result()
                    except _EntryRefused as exc:
                        # Everything before exc.start arrived; find the exact entry the log lacks.
                        raise self._locate(exc.start, b, exc.detail) from None
                    nxt = next(queued, None)
                    if nxt is not None:
                        pending.append((nxt[0], nxt[1], pool.submit(self._fetch, *nxt)))
                    yield from page
            finally:
                for _, _, future in pending:
                    future.cancel()

    def _proof(self, path: str, params: dict[str, Any], member: str) -> tuple[Any, list[bytes]]:
        body = self._get_json(path, params)
        try:
            return body, [_b64(h, "proof hash") for h in body[member]]
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceUnavailable(f"{self._base}{path}: malformed proof ({exc})") from None

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        if first == second or first == 0:
            return []  # by convention (RFC 9162 §2.1.4.1 defines proofs for 0 < first < second)
        return self._proof("/v1/ledger/proof/consistency", {"first": first, "second": second}, "proof")[1]

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        params = {"index": index, "tree_size": tree_size}
        return self._proof("/v1/ledger/proof/inclusion", params, "audit_path")[1]

    def find(self, leaf_hash: bytes, tree_size: int) -> int | None:
        if tree_size < 1:
            return None
        response = self._get("/v1/ledger/proof/inclusion", {"leaf_hash": leaf_hash.hex(), "tree_size": tree_size})
        if response.status_code in (400, 404):
            return None  # unknown, or appended after the tree of ``tree_size``
        if response.status_code != 200:
            raise SourceUnavailable(f"{self._base}/v1/ledger/proof/inclusion: {_describe_error(response)}")
        index = response.json().get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise SourceUnavailable(f"{self._base}/v1/ledger/proof/inclusion: malformed index")
        return index

    def close(self) -> None:
        if self._own_client:
            self._client.close()
