"""The console's pages: server-rendered HTML (Jinja2, autoescaped), no script.

Security: a session cookie (``HttpOnly``, ``SameSite=Strict``, ``Path=/console``, ``Secure`` when
the broker's URL is https); every form carries a CSRF token bound to the session (the login form one
bound to a short-lived pre-login cookie), and a POST whose ``Origin`` is another site is refused.
Pages send a strict Content-Security-Policy (no script at all), ``no-store`` and ``frame-ancestors
'none'``. Decisions go through :class:`~broker.approvals.ApprovalDesk`, exactly as the API's do.
On embedded defaults the sign-in also takes the bootstrap credentials ``serve`` printed
(:mod:`broker.console.bootstrap`); they open the console only.
"""

from __future__ import annotations

import hmac
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from broker.approvals import ApprovalDesk
from broker.approvals.desk import is_owner
from broker.console.bootstrap import BootstrapOperators
from broker.console.ledger_view import LedgerBrowser, SearchFilter, SearchProblems
from broker.console.review_view import budget_use, deciding_rule
from broker.console.sessions import ConsoleSession, ConsoleSessions
from broker.errors import BrokerError, InvalidOperatorToken
from broker.ledger.schema import ENTRY_KINDS
from broker.operators import ROLE_PERMISSIONS, Operator
from broker.runtime import Runtime

__all__ = ["router"]

COOKIE = "nhi_console"
LOGIN_COOKIE = "nhi_console_login"
_HERE = Path(__file__).parent
_MAX_FORM = 32 * 1024
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer browsers send "Origin: null" on our own form posts.
    "Referrer-Policy": "same-origin",
}
#: The search form: (field, label, hint) in SearchFilter order.
_SEARCH_FIELDS = [
    ("workload", "Workload", "name or SPIFFE ID, part of it"), ("owner", "Owner", "part of it"),
    ("resource", "Resource", "part of it, e.g. customers/c-42"), ("customer", "Customer", "exact, e.g. c-42"),
    ("conversation", "Conversation", "exact, e.g. conv-7"), ("action", "Action", "part of it"),
    ("rule", "Rule", "exact rule id"), ("decision", "Decision", "allow, deny or review"),
    ("error", "Error", "exact, e.g. temporarily_unavailable"), ("kind", "Kind", "issuance, denial, approval, ..."),
    ("jti", "Token id (jti)", "exact"), ("leaf_hash", "Leaf hash", "8 to 64 hex digits"),
    ("since", "From (UTC)", "2026-11-23 or 2026-11-23T10:00"), ("until", "Until (UTC, inclusive)", "same forms"),
]
_CURSOR_MAX = 2**53

router = APIRouter(prefix="/console", include_in_schema=False)


def _utc(t: Any) -> str:
    return datetime.fromtimestamp(int(t), tz=UTC).strftime("%Y-%m-%d %H:%M:%S") if isinstance(t, int | float) else ""


_env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"]))
_env.filters["utc"] = _utc
_env.globals["ENTRY_KINDS"] = sorted(ENTRY_KINDS)


class _Console:
    """Per-app console state: sessions in the shared store, the ledger browser of this process."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.sessions = ConsoleSessions(runtime.store, runtime.clock,
                                        runtime.settings.approvals.console_session_minutes * 60)
        self.ledger = LedgerBrowser(runtime.ledger, runtime.ledger_verifier_key, runtime.settings.ledger_origin)
        self.bootstrap = BootstrapOperators(runtime.settings)
        self.secure = runtime.settings.issuer_url.startswith("https://")

    @property
    def desk(self) -> ApprovalDesk:
        assert self.runtime.approvals is not None
        return self.runtime.approvals


def _console(request: Request) -> _Console:
    console = getattr(request.app.state, "console", None)
    if console is None or console.runtime is not request.app.state.runtime:
        console = request.app.state.console = _Console(request.app.state.runtime)
    return console


def _page(name: str, http_status: int = 200, /, **context: Any) -> HTMLResponse:
    html = _env.get_template(name).render(**context)
    return HTMLResponse(html, status_code=http_status, headers=_HEADERS)


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})


def _set_cookie(console: _Console, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True, samesite="strict",
                        secure=console.secure)


async def _form(request: Request) -> dict[str, str]:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise _Refused(415, "forms are sent as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM:
            raise _Refused(413, "the form is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _Refused(400, "the form is not valid") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise _Refused(400, f"form field {key[:32]!r} is repeated")
        form[key] = value
    return form


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _same_origin(request: Request, console: _Console) -> None:
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser cross-site POST (browsers send Origin on cross-site form posts)
    allowed = {f"{request.url.scheme}://{request.url.netloc}"}
    issuer = urlsplit(console.runtime.settings.issuer_url)
    allowed.add(f"{issuer.scheme}://{issuer.netloc}")
    if origin not in allowed:
        raise _Refused(403, "this form was posted from another site")


async def _session(request: Request, console: _Console) -> ConsoleSession | None:
    return await console.sessions.find(request.cookies.get(COOKIE))


def _refused_page(exc: _Refused, session: ConsoleSession | None) -> HTMLResponse:
    return _page("base.html", exc.status, title="Refused", problem=exc.message, session=session)


# -- login --------------------------------------------------------------------------------------


@router.get("")
async def home(request: Request) -> Response:
    """Send the operator to the page of their role, or to sign in."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    return _redirect("/console/approvals" if "approve" in ROLE_PERMISSIONS.get(session.operator.role, ())
                     else "/console/ledger")


@router.get("/login")
async def login_page(request: Request) -> Response:
    """The sign-in form, with a fresh pre-login CSRF token."""
    console = _console(request)
    if await _session(request, console) is not None:
        return _redirect("/console")
    token = secrets.token_urlsafe(24)
    response = _page("login.html", title="Sign in", login_csrf=token, session=None)
    _set_cookie(console, response, LOGIN_COOKIE, token, 900)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the operator credential; start a session."""
    console = _console(request)
    try:
        _same_origin(request, console)
        form = await _form(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            raise _Refused(403, "the sign-in form expired; reload the page and sign in again")
    except _Refused as exc:
        return _refused_page(exc, None)
    assert console.runtime.state is not None
    credential = form.get("credential", "")
    try:
        bootstrapped = await anyio.to_thread.run_sync(console.bootstrap.authenticate, credential)
        operator: Operator = bootstrapped or await console.runtime.state.operators.authenticate(
            "Bearer " + credential)
    except BrokerError as exc:  # a wrong credential (401), or an identity provider unreachable (503)
        token = secrets.token_urlsafe(24)
        problem = ("That credential was not accepted." if isinstance(exc, InvalidOperatorToken)
                   else f"Sign-in is unavailable: {exc.description}")
        response = _page("login.html", exc.status, title="Sign in", login_csrf=token, session=None, problem=problem)
        _set_cookie(console, response, LOGIN_COOKIE, token, 900)
        return response
    cookie, _ = await console.sessions.create(operator)
    redirect = _redirect("/console")
    _set_cookie(console, redirect, COOKIE, cookie, console.sessions.lifetime)
    redirect.delete_cookie(LOGIN_COOKIE, path="/console")
    return redirect


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session."""
    console = _console(request)
    session = await _session(request, console)
    try:
        _same_origin(request, console)
        form = await _form(request)
        if session is not None and not session.csrf_ok(form.get("csrf")):
            raise _Refused(403, "the form expired; reload the page")
    except _Refused as exc:
        return _refused_page(exc, session)
    await console.sessions.end(request.cookies.get(COOKIE))
    response = _redirect("/console/login")
    response.delete_cookie(COOKIE, path="/console")
    return response


# -- approvals ----------------------------------------------------------------------------------

_AuthReqId = Annotated[str, PathParam(min_length=20, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


@router.get("/approvals")
async def approvals(request: Request) -> Response:
    """Every live approval request, pending first."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    requests = [console.desk.public_view(r) for r in await console.desk.listing()]
    return _page("approvals.html", title="Approvals", section="approvals", session=session, requests=requests)


async def _approval_page(console: _Console, session: ConsoleSession, auth_req_id: str, status: int = 200,
                         **extra: Any) -> HTMLResponse:
    try:
        record = await console.desk.get(auth_req_id)
    except BrokerError as exc:
        return _page("base.html", exc.status, title="Approval request", section="approvals", session=session,
                     problem=exc.description)
    operator = session.operator
    why_not = ""
    if "approve" not in ROLE_PERMISSIONS.get(operator.role, ()):
        why_not = f"your role ({operator.role}) does not decide approvals."
    elif record.group not in operator.groups:
        why_not = f"you are not in the approver group {record.group}."
    notice = extra.pop("notice", None)
    if not why_not and is_owner(operator.name, record.owner) and not record.owner_may_approve and not notice:
        notice = "You own this workload: you may deny it, but another approver must approve it."
    policies = console.runtime.policies
    context = record.intent.get("context") or {}
    customer = str((record.user or {}).get("sub") or context.get("customer") or "")
    conversation = str(context.get("conversation") or "")
    history = await console.runtime.lanes.ledger.run(
        console.ledger.recent_decisions, str(record.workload.get("spiffe_id", "")), customer=customer,
        conversation=conversation)
    assert console.runtime.state is not None
    try:
        budgets = await budget_use(policies, console.runtime.state.guard, record)
        budget_problem = None
    except BrokerError as exc:  # the state store is down: say so, the rest of the page still helps
        budgets, budget_problem = [], exc.description
    return _page("approval.html", status, title=f"Approval request {auth_req_id[:8]}…", section="approvals",
                 session=session, r=console.desk.public_view(record), may_decide=not why_not, why_not=why_not,
                 notice=notice, rule=deciding_rule(policies, record), history=history, customer=customer,
                 conversation=conversation, budgets=budgets, budget_problem=budget_problem, **extra)


@router.get("/approvals/{auth_req_id}")
async def approval(request: Request, auth_req_id: _AuthReqId) -> Response:
    """One request: the full intent and context, and the decision form for its approvers."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    done = request.query_params.get("done")
    notice = {"approve": "Your approval is recorded in the ledger.",
              "deny": "Your denial is recorded in the ledger."}.get(done or "")
    return await _approval_page(console, session, auth_req_id, notice=notice)


@router.post("/approvals/{auth_req_id}")
async def decide(request: Request, auth_req_id: _AuthReqId) -> Response:
    """Record an approval or denial with its reason (through the ApprovalDesk)."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    try:
        _same_origin(request, console)
        form = await _form(request)
        if not session.csrf_ok(form.get("csrf")):
            raise _Refused(403, "the form expired; reload the page")
        decision = form.get("decision")
        if decision not in ("approve", "deny"):
            raise _Refused(400, "choose approve or deny")
    except _Refused as exc:
        return _refused_page(exc, session)
    try:
        await console.desk.decide(session.operator, auth_req_id, approve=decision == "approve",
                                  reason=form.get("reason", ""))
    except BrokerError as exc:
        return await _approval_page(console, session, auth_req_id, exc.status, problem=exc.description)
    return _redirect(f"/console/approvals/{auth_req_id}?done={decision}")


# -- ledger -------------------------------------------------------------------------------------


def _cursor(query: dict[str, str], name: str) -> int | None:
    value = query.get(name, "")
    if not value:
        return None
    if re.fullmatch(r"[0-9]{1,16}", value) is None or int(value) > _CURSOR_MAX:
        raise SearchProblems({name: "is not an entry index"})
    return int(value)


@router.get("/ledger")
async def ledger(request: Request) -> Response:
    """The latest checkpoint's verification and the ledger search, one page at a time."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    query = dict(request.query_params)
    status = await console.runtime.lanes.ledger.run(console.ledger.checkpoint_status)
    page = dict(title="Ledger", section="ledger", session=session, status=status, fields=_SEARCH_FIELDS)
    try:
        criteria = SearchFilter.from_query(query)
        before, after = _cursor(query, "before"), _cursor(query, "after")
        if before is not None and after is not None:
            raise SearchProblems({"before": "give before or after, not both"})
    except SearchProblems as exc:
        # Shown back as typed (autoescaped), control characters replaced: the operator sees what to fix.
        values = {name: "".join(c if ord(c) >= 32 else "\ufffd" for c in query.get(name, "")[:256])
                  for name in SearchFilter.fields()}
        return _page("ledger.html", 400, **page, criteria=values, errors=exc.fields, results=None,
                     problem="The search was not run: " + exc.description)
    results = await console.runtime.lanes.ledger.run(console.ledger.search, criteria, before=before, after=after)
    return _page("ledger.html", **page, criteria=criteria.__dict__, errors={}, results=results,
                 search_query=criteria.query())


@router.get("/ledger/{index}")
async def entry(request: Request, index: Annotated[int, PathParam(ge=0, le=2**53)]) -> Response:
    """One entry with its attribution, inclusion proof, cause and neighbours."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    try:
        shown = await console.runtime.lanes.ledger.run(console.ledger.entry, index)
    except BrokerError as exc:
        return _page("base.html", exc.status, title="Ledger entry", section="ledger", session=session,
                     problem=exc.description)
    return _page("entry.html", title=f"Ledger entry {index} ({shown['entry'].get('kind')})", section="ledger",
                 session=session, e=shown, trusted_key=console.ledger.verifier_key)


@router.get("/ledger/{index}/proof.json")
async def entry_proof(request: Request, index: Annotated[int, PathParam(ge=0, le=2**53)]) -> Response:
    """Download entry ``index`` with its inclusion proof and signed checkpoint (``audit prove --entry-proof``)."""
    console = _console(request)
    session = await _session(request, console)
    if session is None:
        return _redirect("/console/login")
    try:
        document = await console.runtime.lanes.ledger.run(console.ledger.entry_proof, index)
    except BrokerError as exc:
        return _page("base.html", exc.status, title="Ledger entry", section="ledger", session=session,
                     problem=exc.description)
    headers = {**_HEADERS, "Content-Disposition": f'attachment; filename="nhi-broker-entry-{index}.proof.json"'}
    return JSONResponse(document, headers=headers)


@router.get("/static/console.css")
async def stylesheet() -> FileResponse:
    """The console's only static file."""
    return FileResponse(_HERE / "static" / "console.css", media_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})
