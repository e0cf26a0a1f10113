"""The docs say true things: JSON examples parse (and ledger entries validate against the auditors'
schema), every test the threat model names exists, every `nhi-broker` command the docs name exists."""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest

from broker.audit.schema import validate_entry
from broker.cli.main import build_parser
from tests.helpers import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])


def fenced_blocks(text: str) -> tuple[list[tuple[str, str]], str]:
    """``([(info, body)], prose)``: the fenced code blocks of a Markdown text, and the text outside them."""
    blocks: list[tuple[str, str]] = []
    prose: list[str] = []
    info: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, body = line[3:].strip(), []
            else:
                blocks.append((info, "\n".join(body) + "\n"))
                info = None
        elif info is None:
            prose.append(line)
        else:
            body.append(line)
    return blocks, "\n".join(prose)


def json_blocks() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        blocks = [b for info, b in fenced_blocks(path.read_text())[0] if info == "json"]
        found += [(f"{path.name}#{i}", b) for i, b in enumerate(blocks)]
    return found


@pytest.mark.parametrize(("where", "block"), json_blocks(), ids=[w for w, _ in json_blocks()])
def test_json_examples_parse_and_ledger_entries_validate(where: str, block: str) -> None:
    value = json.loads(block)
    if isinstance(value, dict) and "kind" in value and "v" in value:
        validate_entry(value)  # raises naming the first bad member


def test_threat_model_names_only_tests_that_exist() -> None:
    text = (REPO / "docs" / "threat-model.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", text))
    assert len(named) >= 40
    for path, name in sorted(named):
        tree = ast.parse((REPO / path).read_text())
        functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in functions, f"docs/threat-model.md names {path}::{name}, which does not exist"


def _commands(text: str) -> list[str]:
    fenced, prose = fenced_blocks(text)
    inline = [span for span in re.findall(r"`([^`\n]*)`", prose) if span.startswith("nhi-broker ")]
    blocks = [line.strip() for info, block in fenced if info in ("sh", "bash", "")
              for line in block.replace("\\\n", " ").splitlines()]
    found = inline + [line[line.index("nhi-broker "):] for line in blocks if "nhi-broker " in line]
    return [c for c in found if not c.startswith(("nhi-broker.local", "nhi-broker:", "nhi-broker-"))]


def _subcommand_path(command: str) -> list[str]:
    words = shlex.split(command.replace("\\|", "|").split("|")[0].split("&&")[0].split(" #")[0].replace("…", "x"))
    path = []
    parser = build_parser()
    for word in words[1:]:
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or word.startswith("-") or word in ("...", "x"):
            break
        choices = actions[0].choices  # type: ignore[attr-defined]
        assert word in choices, f"`{command}`: {' '.join(['nhi-broker', *path])} has no command {word!r}"
        path.append(word)
        parser = choices[word]
    return path


@pytest.mark.parametrize("doc", ["controls.md", "operators.md", "deploy.md", "configuration.md"])
def test_every_nhi_broker_command_in_the_docs_exists(doc: str) -> None:
    commands = _commands((REPO / "docs" / doc).read_text())
    assert commands, doc
    for command in commands:
        _subcommand_path(command)


def test_readme_commands_exist() -> None:
    text = (REPO / "README.md").read_text().replace(".venv/bin/nhi-broker", "nhi-broker")
    for command in _commands(text):
        _subcommand_path(command)


def test_controls_cover_the_frameworks_the_issue_names() -> None:
    text = (REPO / "docs" / "controls.md").read_text()
    for clause in ("GV.OV", "GV.RR", "PR.AA", "DE.CM", "GOVERN 1", "GOVERN 6", "MANAGE 4", "Excessive Agency",
                   "privilege abuse", "Art. 12", "Art. 14", "CC6", "CC7", "A.5.15", "A.5.16", "A.5.17", "A.5.18",
                   "A.8.15"):
        assert clause in text, clause
    first = text.index("## 1.")
    assert "accountable owner" in text[first:first + 200]


def test_license_is_the_apache_license() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


def test_approval_terms_comment_matches_the_policy() -> None:
    comment = (REPO / "policies" / "approvals.toml").read_text()
    policy = (REPO / "policies" / "policy.csv").read_text()
    assert "amount > 50 && amount < 500" in policy
    assert "50 < amount < 500 EUR" in comment and "<= 500" not in comment


def test_readme_operator_example_has_groups() -> None:
    text = (REPO / "README.md").read_text()
    block = text[text.index("[[operators]]"):text.index("[[introspection_clients]]")]
    assert 'role = "approver"' in block and 'groups = ["refund-approvers"]' in block
