"""FastAPI dependencies: routes receive the runtime through ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from broker.runtime import Runtime

__all__ = ["RuntimeDep", "get_runtime"]


async def get_runtime(request: Request) -> Runtime:
    """The :class:`Runtime` built by the app's lifespan (async: resolving it needs no thread hop)."""
    return request.app.state.runtime  # type: ignore[no-any-return]


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
