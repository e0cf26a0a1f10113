"""FastAPI integration for resource servers (needs the ``fastapi`` extra).

    verifier = TaskTokenVerifier(issuer="https://broker.example", audience="payments-api")
    TaskTokenDep = Annotated[VerifiedTaskToken, Depends(TaskTokenDependency(verifier))]

    @app.post("/refunds")
    def refund(body: Refund, token: TaskTokenDep) -> dict:
        token.require_intent("payments.refund", f"customers/{body.customer}/orders/{body.order}",
                             {"customer": body.customer, "amount": body.amount, "currency": body.currency})
        ...

    install_exception_handlers(app)   # IntentMismatchError raised in a route -> 403 insufficient_scope
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from ._errors import InvalidTokenError, TokenVerificationError
from ._verify import TaskTokenVerifier, VerifiedTaskToken

__all__ = ["TaskTokenDependency", "install_exception_handlers"]


def _error_body(exc: TokenVerificationError) -> dict[str, str]:
    return {"error": exc.code, "error_description": exc.description}


class TaskTokenDependency:
    """A dependency that returns the request's :class:`VerifiedTaskToken` or answers 401/403/503.

    ``public_url`` is the scheme and host clients use to reach this service (``htu`` of their DPoP
    proofs); by default the URL the request arrived at.
    """

    def __init__(self, verifier: TaskTokenVerifier, *, public_url: str | None = None) -> None:
        self.verifier = verifier
        self.public_url = public_url.rstrip("/") if public_url else None

    def __call__(self, request: Request) -> VerifiedTaskToken:
        url = self.public_url + request.url.path if self.public_url else str(request.url)
        proofs = request.headers.getlist("dpop")
        authorizations = request.headers.getlist("authorization")
        try:
            if len(proofs) > 1 or len(authorizations) > 1:
                raise InvalidTokenError("repeated Authorization or DPoP header")
            return self.verifier.verify_request(
                authorizations[0] if authorizations else None, proofs[0] if proofs else None, request.method, url
            )
        except TokenVerificationError as exc:
            raise HTTPException(exc.status, detail=_error_body(exc),
                                headers={"WWW-Authenticate": exc.www_authenticate()}) from None


def install_exception_handlers(app: FastAPI) -> None:
    """Answer a :class:`TokenVerificationError` raised in a route (e.g. an intent mismatch) with its
    status, an RFC 6750 error body and a ``WWW-Authenticate`` challenge."""

    @app.exception_handler(TokenVerificationError)
    async def _token_error(request: Request, exc: TokenVerificationError) -> JSONResponse:
        return JSONResponse(_error_body(exc), status_code=exc.status,
                            headers={"WWW-Authenticate": exc.www_authenticate()})
