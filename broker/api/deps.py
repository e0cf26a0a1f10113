"""FastAPI dependencies: routes receive the runtime through ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.errors import InvalidRequest
from broker.runtime import Runtime

__all__ = ["RuntimeDep", "get_runtime", "single_header"]


async def get_runtime(request: Request) -> Runtime:
    """The :class:`Runtime` built by the app's lifespan (async: resolving it needs no thread hop)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def single_header(request: Request, name: str) -> str | None:
    """The value of header ``name``, ``None`` when absent; 400 ``invalid_request`` when it is repeated.

    Starlette's ``headers.get`` returns the first of repeated headers; a proxy or another reader may
    take the last. A credential header two parties could read differently is refused outright
    (RFC 9110 §5.3: only list-valued fields may repeat; ``Authorization`` is not one).
    """
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise InvalidRequest(f"the {name} header is sent more than once")
    return values[0] if values else None
