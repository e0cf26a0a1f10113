"""``audit report``: a self-contained HTML report of a verified ledger, for auditors.

:func:`build_report` verifies the ledger first (:func:`~broker.audit.verify.verify_ledger`, with the
auditor's key) and reads each entry again only if its leaf hash is the one in the verified tree, so
every figure in the report is backed by signed evidence. :func:`render_html` writes one HTML file
with no external assets (inline CSS, inline SVG charts, no script): the verification result and the
verifier key used, then per accountable owner and per workload the issuances, denials by reason,
approvals and who gave them, revocations and suspensions, per day. Every number links to the list
of entries behind it, and every entry to its row in the appendix (index, time, leaf hash, what it
records), so any figure can be checked with ``audit prove --leaf-hash``.
"""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from html import escape
from typing import Any

from broker.audit.source import LedgerSource
from broker.audit.verify import VerifierKeys, verified_entries, verify_ledger

__all__ = ["CATEGORIES", "AuditReport", "build_report", "render_html"]

CATEGORIES = ("issuances", "denials", "approvals", "revocations", "suspensions")
_COLORS = {"issuances": "#2f7d32", "denials": "#c62828", "approvals": "#1565c0", "revocations": "#6a1b9a",
           "suspensions": "#ef6c00"}


@dataclass
class _Subject:
    """One owner or one workload: entry indexes per category, per day and per detail."""

    name: str
    owner: str = ""
    by_category: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    by_day: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    denial_reasons: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    approvers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def add(self, category: str, day: str, index: int, detail: str | None = None) -> None:
        self.by_category[category].append(index)
        self.by_day[(day, category)].append(index)
        if category == "denials" and detail:
            self.denial_reasons[detail].append(index)
        if category == "approvals" and detail:
            self.approvers[detail].append(index)


@dataclass
class AuditReport:
    """What :func:`render_html` shows. Built only by :func:`build_report`, from a verified ledger."""

    origin: str
    size: int
    root: str
    note: str
    verifier_keys: list[str]
    signed_by: str
    since: str | None
    until: str | None
    owners: dict[str, _Subject] = field(default_factory=dict)
    workloads: dict[str, _Subject] = field(default_factory=dict)
    entries: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    by_kind: Counter[str] = field(default_factory=Counter)

    @property
    def days(self) -> list[str]:
        """Every day with an entry in the report, in order."""
        return sorted({day for s in self.workloads.values() for day, _ in s.by_day})


def _category(entry: dict[str, Any]) -> tuple[str, str | None] | None:
    kind = entry["kind"]
    if kind == "issuance":
        return "issuances", None
    if kind == "denial":
        d = entry["decision"]
        return "denials", d["error"] + (f" (rule {d['rule']})" if d.get("rule") else "")
    if kind == "approval":
        a = entry["approval"]
        who = a["approver"]["name"] if a.get("approver") else "(expired)"
        return "approvals", f"{who}: {a['outcome']}"
    if kind == "revocation":
        return "revocations", None
    if kind == "suspension":
        return "suspensions", entry["suspension"]["state"]
    return None


def _workload_of(entry: dict[str, Any]) -> str | None:
    if "workload" in entry:
        w = entry["workload"]
        return str(w.get("name") or w["spiffe_id"])
    if entry["kind"] == "suspension":
        return str(entry["suspension"]["workload"])
    if entry["kind"] == "revocation":
        r = entry["revocation"]
        if r["scope"] in ("token", "lease"):
            return str(r["workload"])
        if r["scope"] == "workload":
            return str(r["value"])
    return None


def build_report(
    source: LedgerSource,
    verifier_key: VerifierKeys,
    *,
    since: str | None = None,
    until: str | None = None,
) -> AuditReport:
    """Verify ``source`` with the auditor's key, then gather the report's figures from its entries.

    Raises :class:`~broker.audit.errors.AuditFailure` (or a consistency violation) when the ledger
    does not verify: nothing is reported about an unverified ledger.
    """
    verified = verify_ledger(source, verifier_key)
    keys = [verifier_key] if isinstance(verifier_key, str) else list(verifier_key)
    report = AuditReport(
        origin=verified.checkpoint.origin, size=verified.checkpoint.size,
        root=base64.b64encode(verified.checkpoint.root).decode(), note=verified.note, verifier_keys=keys,
        signed_by=verified.signed_by, since=since, until=until,
    )
    owner_of: dict[str, str] = {}
    pending: list[tuple[int, str, str, str, str | None]] = []
    for index, digest, entry in verified_entries(source, verified):
        time = entry["time"]
        if (since is not None and time < since) or (until is not None and time >= until):
            continue
        report.by_kind[entry["kind"]] += 1
        if "workload" in entry and entry["workload"].get("owner"):
            owner_of[str(entry["workload"].get("name"))] = entry["workload"]["owner"]
        found = _category(entry)
        workload = _workload_of(entry)
        if found is None or workload is None:
            continue
        report.entries[index] = (digest.hex(), entry)
        pending.append((index, time[:10], workload, found[0], found[1]))
    # Owners are known from the entries that name them; a revocation or suspension names only the
    # workload, so it is charged to the owner the ledger records for that workload.
    for index, day, workload, category, detail in pending:
        owner = owner_of.get(workload, "(no registered owner)")
        for table, key in ((report.workloads, workload), (report.owners, owner)):
            subject = table.get(key)
            if subject is None:
                subject = table[key] = _Subject(key, owner if table is report.workloads else "")
            subject.add(category, day, index, detail)
    return report


class _Links:
    """Sets of entry indexes, each with an anchor; a number in the report links to its set."""

    def __init__(self) -> None:
        self.sets: list[tuple[str, list[int]]] = []

    def number(self, label: str, indexes: list[int]) -> str:
        if not indexes:
            return '<span class="zero">0</span>'
        self.sets.append((label, indexes))
        return f'<a href="#s{len(self.sets)}">{len(indexes)}</a>'

    def anchor(self, label: str, indexes: list[int]) -> str:
        self.sets.append((label, indexes))
        return f"#s{len(self.sets)}"


def _chart(subject: _Subject, days: list[str], links: _Links) -> str:
    """A stacked bar per day (inline SVG); each segment links to its entries."""
    if not days:
        return ""
    totals = [sum(len(subject.by_day.get((d, c), [])) for c in CATEGORIES) for d in days]
    peak = max(totals) or 1
    height, left, bottom = 160, 40, 30
    bar = max(4.0, min(36.0, 900 / len(days)))  # one bar per day, never a wall of colour
    width = int(left + bar * len(days) + 20)
    parts = [f'<svg class="chart" width="{width}" height="{height + bottom}" role="img" '
             f'aria-label="{escape(subject.name)} per day" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{left}" y1="{height}" x2="{width - 5}" y2="{height}" stroke="#999"/>',
             f'<text x="{left - 6}" y="12" text-anchor="end" class="axis">{peak}</text>',
             f'<text x="{left - 6}" y="{height}" text-anchor="end" class="axis">0</text>']
    for i, day in enumerate(days):
        y = float(height)
        x = left + i * bar + 2
        for category in CATEGORIES:
            indexes = subject.by_day.get((day, category), [])
            if not indexes:
                continue
            h = len(indexes) / peak * (height - 15)
            y -= h
            href = links.anchor(f"{subject.name}: {category} on {day}", indexes)
            parts.append(f'<a href="{href}"><rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 4, 2):.1f}" '
                         f'height="{h:.1f}" fill="{_COLORS[category]}"><title>{escape(day)}: {len(indexes)} '
                         f'{category}</title></rect></a>')
        if len(days) <= 16 or i % max(1, len(days) // 8) == 0:
            parts.append(f'<text x="{x + bar / 2:.1f}" y="{height + 16}" text-anchor="middle" class="axis">'
                         f'{escape(day[5:])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _counts_row(name: str, subject: _Subject, links: _Links, owner: str | None = None) -> str:
    cells = "".join(f'<td class="n">{links.number(f"{name}: {c}", subject.by_category.get(c, []))}</td>'
                    for c in CATEGORIES)
    owner_cell = f"<td>{escape(owner)}</td>" if owner is not None else ""
    return f"<tr><th scope=\"row\">{escape(name)}</th>{owner_cell}{cells}</tr>"


def _details(title: str, rows: dict[str, list[int]], subject: str, links: _Links) -> str:
    if not rows:
        return ""
    body = "".join(f'<tr><td>{escape(k)}</td><td class="n">{links.number(f"{subject}: {title} {k}", v)}</td></tr>'
                   for k, v in sorted(rows.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    return f'<table class="detail"><caption>{escape(title)}</caption>{body}</table>'


def _summary(entry: dict[str, Any]) -> str:
    kind = entry["kind"]
    if kind in ("issuance", "denial", "approval"):
        i = entry["intent"]
        text = f"{i['action']} on {i['resource']} for {entry['audience']}; rule {entry['decision'].get('rule')}"
        if kind == "denial":
            text += f"; {entry['decision']['error']}: {entry['decision']['reason']}"
        if kind == "approval":
            a = entry["approval"]
            text += f"; {a['outcome']} by {(a.get('approver') or {}).get('name', '(expiry)')}"
        return text
    if kind == "revocation":
        r = entry["revocation"]
        return f"revoked {r['scope']} {r.get('value') or r.get('jti', '')}: {r['reason']}"
    if kind == "suspension":
        s = entry["suspension"]
        return f"{s['state']} {s['workload']}: {s['reason']}"
    return str(kind)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;
border-bottom:1px solid #ddd;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.verdict{border:2px solid #2f7d32;background:#f1f8f1;padding:10px 14px;border-radius:6px}
.verdict b{color:#2f7d32}code{font:12px ui-monospace,monospace;word-break:break-all}
table{border-collapse:collapse;margin:6px 0 12px}th,td{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
.zero{color:#bbb}.axis{font-size:10px;fill:#666}.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}.detail{display:inline-table;
margin-right:24px}caption{text-align:left;font-weight:600;padding:2px 0}.sets li{margin:2px 0}
.entries td{font-size:12px}a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
@media print{a{color:#222}h2{break-after:avoid}}
"""


def render_html(report: AuditReport, generated_at: str) -> str:
    """The report as one self-contained HTML document (no external assets, no script)."""
    links = _Links()
    days = report.days
    period = f"{report.since or 'the first entry'} to {report.until or 'the last entry'}"
    rotated = report.signed_by and report.signed_by not in report.verifier_keys
    head = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>Ledger audit report — {escape(report.origin)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Ledger audit report — {escape(report.origin)}</h1>",
        f"<p>Generated {escape(generated_at)}; period: {escape(period)}.</p>",
        '<div class="verdict"><p><b>VERIFIED.</b> Every entry of the ledger was checked against its signed '
        f"checkpoint: {report.size} entries, root <code>{escape(report.root)}</code>.</p>",
        "<p>Verifier key used (given by the auditor, not taken from the source): "
        + ", ".join(f"<code>{escape(k)}</code>" for k in report.verifier_keys) + "</p>",
    ]
    if rotated:
        head.append(f"<p>The ledger key was rotated: the checkpoint is signed by <code>{escape(report.signed_by)}"
                    "</code>, endorsed in the ledger by a key given.</p>")
    head.append(f"<details><summary>Signed checkpoint</summary><pre>{escape(report.note)}</pre></details></div>")
    legend = '<p class="legend">' + "".join(
        f'<span><i style="background:{_COLORS[c]}"></i>{c}</span>' for c in CATEGORIES) + "</p>"
    columns = "".join(f"<th>{c}</th>" for c in CATEGORIES)
    body = ["<h2>By accountable owner</h2>", legend,
            f"<table><tr><th>owner</th>{columns}</tr>"
            + "".join(_counts_row(name, s, links) for name, s in sorted(report.owners.items())) + "</table>"]
    for name, owner in sorted(report.owners.items()):
        body.append(f"<h3>{escape(name)}</h3>{_chart(owner, days, links)}")
        workloads = [(n, w) for n, w in sorted(report.workloads.items()) if w.owner == name]
        body.append(f"<table><tr><th>workload</th><th>owner</th>{columns}</tr>"
                    + "".join(_counts_row(n, w, links, w.owner) for n, w in workloads) + "</table>")
        body.append(_details("denials by reason", owner.denial_reasons, name, links)
                    + _details("approvals by approver", owner.approvers, name, links))
    body.append("<h2>By workload</h2>")
    for name, workload in sorted(report.workloads.items()):
        body.append(f"<h3>{escape(name)} <small>(owner {escape(workload.owner)})</small></h3>"
                    f"{_chart(workload, days, links)}"
                    + _details("denials by reason", workload.denial_reasons, name, links)
                    + _details("approvals by approver", workload.approvers, name, links))
    body.append("<h2>Entries behind each number</h2><ol class=\"sets\">")
    for i, (label, indexes) in enumerate(links.sets, 1):
        refs = " ".join(f'<a href="#e{n}">{n}</a>' for n in indexes)
        body.append(f'<li id="s{i}"><b>{escape(label)}</b> ({len(indexes)}): {refs}</li>')
    body.append("</ol><h2>Entries</h2><p>Index, time, kind, workload, what the entry records, and its leaf "
                "hash (<code>nhi-broker audit prove --leaf-hash</code> proves it in the signed tree).</p>"
                '<table class="entries"><tr><th>index</th><th>time</th><th>kind</th><th>workload</th>'
                "<th>records</th><th>leaf hash</th></tr>")
    for index, (digest, entry) in sorted(report.entries.items()):
        body.append(f'<tr id="e{index}"><td>{index}</td><td>{escape(entry["time"])}</td><td>{escape(entry["kind"])}'
                    f"</td><td>{escape(_workload_of(entry) or '')}</td><td>{escape(_summary(entry))}</td>"
                    f"<td><code>{digest}</code></td></tr>")
    body.append("</table></body></html>")
    return "".join(head + body)
