"""Read API of the ledger: signed checkpoint, entries, inclusion and consistency proofs (RFC 6962).

Every read runs on the ledger-read lane (:mod:`broker.isolation`): it catches the Merkle tree up
from storage under the tree's thread lock, which the event loop never takes.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse, Response

from broker.api.deps import RuntimeDep
from broker.api.forms import read_body
from broker.errors import InvalidRequest, NotFound
from broker.ledger.cosignature import CosignatureVerifier
from broker.ledger.merkle import leaf_hash
from broker.runtime import Runtime

__all__ = ["router"]

router = APIRouter(prefix="/v1/ledger")

_HEX64 = r"^[0-9a-f]{64}$"


def _parsed(leaf: bytes) -> Any:
    """The entry for convenience; ``None`` for a leaf that is not JSON (auditors read ``leaf`` anyway)."""
    try:
        return json.loads(leaf)
    except ValueError:
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@router.get("/checkpoint", response_class=PlainTextResponse,
            summary="The latest tree head: a C2SP tlog-checkpoint in a signed note (plus witness cosignatures)")
async def checkpoint(runtime: RuntimeDep) -> PlainTextResponse:
    note = await runtime.lanes.ledger.run(runtime.ledger.checkpoint_with_cosignatures)
    return PlainTextResponse(note, headers={"Cache-Control": "no-cache"})


@router.get("/checkpoint/cosigned", response_class=PlainTextResponse,
            summary="The largest checkpoint cosigned by witnesses (C2SP tlog-cosignature), with the cosignatures")
async def cosigned_checkpoint(runtime: RuntimeDep) -> PlainTextResponse:
    note = await runtime.lanes.ledger.run(runtime.ledger.latest_cosigned_checkpoint)
    return PlainTextResponse(note, headers={"Cache-Control": "no-cache"})


@router.get("/tiles/checkpoint", response_class=PlainTextResponse,
            summary="C2SP tlog-tiles: the checkpoint (same as /v1/ledger/checkpoint)")
async def tiles_checkpoint(runtime: RuntimeDep) -> PlainTextResponse:
    note = await runtime.lanes.ledger.run(runtime.ledger.checkpoint_with_cosignatures)
    return PlainTextResponse(note, headers={"Cache-Control": "no-cache"})


@router.get("/tiles/tile/{path:path}", summary="C2SP tlog-tiles: hash tiles <L>/<N>[.p/<W>] and entries/<N>[.p/<W>]")
async def tile(path: str, runtime: RuntimeDep) -> Response:
    body, full = await runtime.lanes.ledger.run(runtime.ledger.tile, path)
    # Tile contents never change; a partial tile is superseded by its full tile, so cache it briefly.
    cache = "public, max-age=31536000, immutable" if full else "public, max-age=60"
    return Response(body, media_type="application/octet-stream", headers={"Cache-Control": cache})


@router.post("/cosignatures", summary="Publish witness cosignatures of a checkpoint (self-authenticating)")
async def publish_cosignatures(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    witnesses = [CosignatureVerifier(key) for key in runtime.settings.ledger_witnesses]
    if not witnesses:
        raise NotFound("this broker has no witnesses configured (ledger_witnesses)")
    body = await read_body(request, 65536)  # streamed with the cap: never buffered beyond it
    try:
        note = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not UTF-8 text") from None
    cosignatures = await runtime.lanes.ledger.run(runtime.ledger.publish_cosignatures, note, witnesses)
    return {"accepted": [{"witness": c.name, "timestamp": c.timestamp} for c in cosignatures]}


@router.get("/entries", summary="Entries [start, end) with their exact leaf bytes (base64) and leaf hashes")
async def entries(
    runtime: RuntimeDep,
    start: Annotated[int, Query(ge=0)],
    end: Annotated[int, Query(ge=1)],
) -> dict[str, Any]:
    return await runtime.lanes.ledger.run(_entries, runtime, start, end)


def _entries(runtime: Runtime, start: int, end: int) -> dict[str, Any]:
    # On the ledger lane: up to a thousand leaves are hashed and encoded here.
    leaves = runtime.ledger.entries(start, end)
    return {
        "start": start,
        "entries": [
            {
                "index": start + i,
                "leaf_hash": leaf_hash(leaf).hex(),
                "leaf": _b64(leaf),
                "entry": _parsed(leaf),
            }
            for i, leaf in enumerate(leaves)
        ],
    }


@router.get("/proof/inclusion", summary="RFC 6962 audit path for an entry, by index or by leaf hash")
async def inclusion(
    runtime: RuntimeDep,
    tree_size: Annotated[int, Query(ge=1)],
    index: Annotated[int | None, Query(ge=0)] = None,
    leaf_hash_hex: Annotated[str | None, Query(alias="leaf_hash", pattern=_HEX64)] = None,
) -> dict[str, Any]:
    if (index is None) == (leaf_hash_hex is None):
        raise InvalidRequest("give exactly one of index or leaf_hash")
    return await runtime.lanes.ledger.run(_inclusion, runtime, tree_size, index, leaf_hash_hex)


def _inclusion(runtime: Runtime, tree_size: int, index: int | None, leaf_hash_hex: str | None) -> dict[str, Any]:
    if index is None:
        assert leaf_hash_hex is not None
        index = runtime.ledger.find(leaf_hash_hex)
    proof = runtime.ledger.inclusion_proof(index, tree_size)
    hashes = leaf_hash(runtime.ledger.entries(index, index + 1)[0]).hex()
    return {"index": index, "tree_size": tree_size, "leaf_hash": hashes, "audit_path": [_b64(h) for h in proof]}


@router.get("/proof/consistency", summary="RFC 6962 consistency proof between two tree sizes")
async def consistency(
    runtime: RuntimeDep,
    first: Annotated[int, Query(ge=1)],
    second: Annotated[int, Query(ge=1)],
) -> dict[str, Any]:
    proof = await runtime.lanes.ledger.run(runtime.ledger.consistency_proof, first, second)
    return {"first": first, "second": second, "proof": [_b64(h) for h in proof]}
