"""Read API of the ledger: signed checkpoint, entries, inclusion and consistency proofs (RFC 6962)."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from broker.api.deps import RuntimeDep
from broker.errors import InvalidRequest
from broker.ledger.merkle import leaf_hash

__all__ = ["router"]

router = APIRouter(prefix="/v1/ledger")

_HEX64 = r"^[0-9a-f]{64}$"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@router.get("/checkpoint", response_class=PlainTextResponse,
            summary="The latest tree head: a C2SP tlog-checkpoint in a signed note")
def checkpoint(runtime: RuntimeDep) -> PlainTextResponse:
    return PlainTextResponse(runtime.ledger.checkpoint(), headers={"Cache-Control": "no-cache"})


@router.get("/entries", summary="Entries [start, end) with their exact leaf bytes (base64) and leaf hashes")
def entries(
    runtime: RuntimeDep,
    start: Annotated[int, Query(ge=0)],
    end: Annotated[int, Query(ge=1)],
) -> dict[str, Any]:
    leaves = runtime.ledger.entries(start, end)
    return {
        "start": start,
        "entries": [
            {
                "index": start + i,
                "leaf_hash": leaf_hash(leaf).hex(),
                "leaf": _b64(leaf),
                "entry": json.loads(leaf),
            }
            for i, leaf in enumerate(leaves)
        ],
    }


@router.get("/proof/inclusion", summary="RFC 6962 audit path for an entry, by index or by leaf hash")
def inclusion(
    runtime: RuntimeDep,
    tree_size: Annotated[int, Query(ge=1)],
    index: Annotated[int | None, Query(ge=0)] = None,
    leaf_hash_hex: Annotated[str | None, Query(alias="leaf_hash", pattern=_HEX64)] = None,
) -> dict[str, Any]:
    if (index is None) == (leaf_hash_hex is None):
        raise InvalidRequest("give exactly one of index or leaf_hash")
    if index is None:
        assert leaf_hash_hex is not None
        index = runtime.ledger.find(leaf_hash_hex)
    proof = runtime.ledger.inclusion_proof(index, tree_size)
    hashes = leaf_hash(runtime.ledger.entries(index, index + 1)[0]).hex()
    return {"index": index, "tree_size": tree_size, "leaf_hash": hashes, "audit_path": [_b64(h) for h in proof]}


@router.get("/proof/consistency", summary="RFC 6962 consistency proof between two tree sizes")
def consistency(
    runtime: RuntimeDep,
    first: Annotated[int, Query(ge=1)],
    second: Annotated[int, Query(ge=1)],
) -> dict[str, Any]:
    proof = runtime.ledger.consistency_proof(first, second)
    return {"first": first, "second": second, "proof": [_b64(h) for h in proof]}
