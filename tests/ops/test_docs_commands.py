"""Every command block of docs/*.md runs as written in a test, or says in the doc, checkably, why not.

A command block is a fenced block tagged ``sh`` (an untagged block that starts with a command is an
error: tag it). Each is, per document:

- run here, in order, by bash in a directory laid out like a fresh clone (``.venv``, ``policies/``),
  against real servers (:data:`RUNNERS`); a block that starts a server (``nhi-broker serve``) runs in
  the background until it answers, on a free port (``NHI_BROKER_PORT``), and is stopped;
- or marked on the line above its fence with ``<!-- docs-test: KIND DETAIL -->``, checked here:

  - ``covered-by tests/FILE.py::test_NAME`` -- that test does what the block does (it must exist);
  - ``install`` -- a ``pip install`` of this repository's extras or the SDK's: checked to be part of
    what the test environment installs (scripts/test.sh), so every test here runs on it;
  - ``needs docker-engine`` -- checked to be missing on this machine (``docker info`` fails): once
    an engine is there, the marker fails and the block must be run.

README.md and docs/operators.md are run by tests/ops/test_readme_commands.py. A JSON example of
what the broker serves is compared, member by member, with what it served in the run of its
document (docs/vault.md's token answer and revocation entry); ledger entries in JSON examples are
validated by tests/ops/test_docs_examples.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import POLICIES, REPO, free_port
from tests.ops.test_docs_examples import fenced_blocks

_MARKER = re.compile(r"<!-- docs-test: (covered-by|install|needs) (.*?)\s*-->")
_COMMANDS = ("pip ", "python", ".venv/", "nhi-broker ", "curl ", "export ", "docker ", "source ", "bash ")
# Run elsewhere: the README and the operators' guide (tests/ops/test_readme_commands.py).
_RUN_ELSEWHERE = {"operators.md"}


@dataclass(frozen=True)
class Block:
    """One ``sh`` block of a document: its position, body and marker (kind, detail), if any."""

    doc: str
    index: int
    body: str
    marker: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"{self.doc}#{self.index}"


def doc_blocks(doc: str) -> list[Block]:
    """The ``sh`` blocks of ``docs/<doc>``, each with the marker on the line above its fence."""
    lines = (REPO / "docs" / doc).read_text().splitlines()
    out: list[Block] = []
    inside, info, start, body = False, "", 0, []
    for number, line in enumerate(lines):
        if line.startswith("```"):
            if not inside:
                inside, info, start, body = True, line[3:].strip(), number, []
                continue
            inside = False
            if info == "sh":
                above = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
                match = _MARKER.fullmatch(above.strip())
                out.append(Block(doc, len(out), "\n".join(body) + "\n",
                                 (match.group(1), match.group(2)) if match else None))
        elif inside:
            body.append(line)
    return out


def all_docs() -> list[str]:
    return sorted(p.name for p in (REPO / "docs").glob("*.md"))


def all_blocks() -> list[Block]:
    return [b for doc in all_docs() if doc not in _RUN_ELSEWHERE for b in doc_blocks(doc)]


def marked(kind: str) -> list[Block]:
    return [b for b in all_blocks() if b.marker is not None and b.marker[0] == kind]


# -- the markers, checked -----------------------------------------------------------------------------


@pytest.mark.parametrize("doc", all_docs())
def test_command_blocks_are_tagged(doc: str) -> None:
    for info, body in fenced_blocks((REPO / "docs" / doc).read_text())[0]:
        first = body.lstrip().splitlines()[0] if body.strip() else ""
        assert info or not first.startswith(_COMMANDS), f"{doc}: tag this command block sh: {first}"


@pytest.mark.parametrize("block", marked("covered-by"), ids=lambda b: b.id)
def test_covered_by_names_a_test_that_exists(block: Block) -> None:
    assert block.marker is not None
    target = block.marker[1].split()[0]
    path, _, name = target.partition("::")
    assert re.fullmatch(r"tests/[\w/]+\.py", path) and name.startswith("test_"), target
    assert re.search(rf"^def {re.escape(name)}\(", (REPO / path).read_text(), re.M), f"{target} does not exist"


def _test_install() -> tuple[set[str], set[str]]:
    """(requirements of the broker's test extra, the SDK extras scripts/test.sh installs)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    test = {re.split(r"[<>=\[ ]", r)[0].lower() for r in project["optional-dependencies"]["test"]}
    script = (REPO / "scripts" / "test.sh").read_text()
    sdk = re.search(r"-e '\./clients/python\[([\w,-]+)\]'", script)
    assert sdk is not None and "-e '.[test]'" in script
    return test, set(sdk.group(1).split(","))


@pytest.mark.parametrize("block", marked("install"), ids=lambda b: b.id)
def test_installs_are_what_the_tests_run_on(block: Block) -> None:
    test_requirements, sdk_extras = _test_install()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    targets = [word for line in block.body.splitlines() if "pip install" in line
               for word in shlex.split(line.split("pip install", 1)[1].split("#")[0].split("&&")[0])
               if not word.startswith("-")]
    assert targets, block.body
    for target in targets:
        match = re.fullmatch(r"(\.|\./clients/python)(?:\[([\w,-]+)\])?", target)
        assert match is not None, f"{block.id}: installs {target}, which is not this repository"
        wanted = set(match.group(2).split(",")) if match.group(2) else set()
        if match.group(1) == ".":
            for extra in wanted - {"test"}:
                needed = {re.split(r"[<>=\[ ]", r)[0].lower() for r in extras[extra]}
                assert needed <= test_requirements, f"{block.id}: [{extra}] is not in the test extra"
        else:
            assert wanted <= sdk_extras, f"{block.id}: the SDK's {wanted - sdk_extras} are not installed by test.sh"


@pytest.mark.parametrize("block", marked("needs"), ids=lambda b: b.id)
def test_what_a_block_needs_is_missing_here(block: Block) -> None:
    assert block.marker is not None
    need = block.marker[1].split()[0]
    assert need == "docker-engine", f"{block.id}: unknown need {need!r}"
    docker = shutil.which("docker")
    if docker is not None:
        engine = subprocess.run([docker, "info"], capture_output=True, timeout=60)
        assert engine.returncode != 0, f"{block.id}: a Docker engine is available: run this block in a test"


# -- the blocks, run ----------------------------------------------------------------------------------


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A directory laid out like a fresh clone after its install step."""
    root = tmp_path / "clone"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.prefix))
    (root / "policies").symlink_to(POLICIES)
    (root / "deploy").symlink_to(REPO / "deploy")
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `nhi-broker` as after `source .venv/bin/activate`
    return {**env, **extra}


def run_block(block: Block, cwd: Path, **env: str) -> str:
    """Run one block with bash (``set -euo pipefail``); returns its output, failing on a non-zero exit."""
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.body], cwd=cwd, capture_output=True,
                         text=True, env=_env(**env), timeout=300)
    assert out.returncode == 0, f"{block.id} failed:\n{block.body}\n{out.stdout}{out.stderr}"
    return out.stdout + out.stderr


@dataclass
class Served:
    port: int
    log: Path


@pytest.fixture
def serve_block() -> Iterator[object]:
    """Runs a block that starts a server, in the background, until ``ready`` (a path on its port)
    answers 200; stops it (its whole process group) afterwards. The port is free: ``NHI_BROKER_PORT``,
    or ``port`` when the block's own command is given one by the caller."""
    running: list[subprocess.Popen[bytes]] = []

    def start(block: Block, cwd: Path, *, port: int | None = None, body: str | None = None,
              ready: str = "/healthz", **env: str) -> Served:
        port = port or free_port()
        log = cwd / f"serve-{block.doc}-{block.index}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(["bash", "-c", "set -euo pipefail\n" + (body or block.body)], cwd=cwd,
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=_env(NHI_BROKER_PORT=str(port), **env))
        running.append(proc)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{block.id} exited:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code == 200:
                    return Served(port, log)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{block.id} did not answer:\n{log.read_text()}")

    yield start
    for proc in reversed(running):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def unmarked(doc: str) -> list[Block]:
    return [b for b in doc_blocks(doc) if b.marker is None]


#: The documents whose unmarked blocks the tests below run (a new document with blocks joins here).
RUNNERS = {"observability.md", "deploy.md", "sdk.md", "vault.md"}


def test_every_unmarked_block_is_run() -> None:
    for block in all_blocks():
        assert block.marker is not None or block.doc in RUNNERS, f"{block.id} is neither run nor marked"


def test_observability_blocks_run_as_written(clone: Path, serve_block: object) -> None:
    import json

    json_serve, otlp_serve = unmarked("observability.md")
    served = serve_block(json_serve, clone)  # type: ignore[operator]
    assert httpx.get(f"http://127.0.0.1:{served.port}/v1/ledger/checkpoint").status_code == 200
    lines = [line for line in served.log.read_text().splitlines() if line.startswith("{")]
    assert lines and all("time" in json.loads(line) for line in lines)
    # The OTLP endpoint of the example has no collector here: the broker serves all the same.
    other = serve_block(otlp_serve, clone)  # type: ignore[operator]
    assert httpx.get(f"http://127.0.0.1:{other.port}/readyz").status_code == 200


def test_deploy_backup_block_runs_as_written(clone: Path) -> None:
    (backup,) = unmarked("deploy.md")
    assert backup.body.startswith("pg_dump ")
    run_block(backup, clone, NHI_BROKER_LEDGER_URL="postgresql://postgres@127.0.0.1:5432/test")
    dumps = list(clone.glob("nhi-ledger-*.dump"))
    assert len(dumps) == 1 and dumps[0].read_bytes().startswith(b"PGDMP")


def test_sdk_benchmark_block_runs_as_written(clone: Path) -> None:
    (bench,) = unmarked("sdk.md")
    (clone / "scripts").symlink_to(REPO / "scripts")
    out = run_block(bench, clone)
    assert "bearer" in out and "DPoP" in out


def test_vault_blocks_run_as_written(clone: Path, serve_block: object) -> None:
    """docs/vault.md from a fresh clone: a dev OpenBao, a broker with its settings, a row-scoped database
    user used and released, a wrapped secret unwrapped once. The one change: the doc's fixed ports
    (OpenBao 8200, the broker 8080) become free ones, as other tests run on this machine meanwhile.
    The blocks show refusals as their output (psql's, bao's), so they run without ``set -e`` and
    their output is checked instead."""
    dev_vault, broker, db_user, wrapped = unmarked("vault.md")
    assert "nhi-broker dev vault" in dev_vault.body and "nhi-broker serve" in broker.body
    vault_port = _free_pair()
    with_port = dev_vault.body.replace("nhi-broker dev vault", f"nhi-broker dev vault --port {vault_port}")
    vault = serve_block(dev_vault, clone, port=vault_port, ready="/v1/sys/health", body=with_port)  # type: ignore[operator]
    deadline = time.monotonic() + 60  # configured (AppRole, database, KV) once it printed the settings
    while "Ctrl-C stops" not in vault.log.read_text():
        assert time.monotonic() < deadline, vault.log.read_text()
        time.sleep(0.2)
    assert (clone / ".nhi-broker" / "dev-vault" / "env").is_file()
    served = serve_block(broker, clone)  # type: ignore[operator]
    ports = {"127.0.0.1:8080": f"127.0.0.1:{served.port}", "127.0.0.1:8200": f"127.0.0.1:{vault_port}"}

    def run(block: Block) -> str:
        body = block.body
        for old, new in ports.items():
            body = body.replace(old, new)
        out = subprocess.run(["bash", "-c", "set -uo pipefail\n" + body], cwd=clone, capture_output=True, text=True,
                             env=_env(), timeout=120)
        return out.stdout + out.stderr

    out = run(db_user)
    assert "c-1001" in out and "(1 row)" in out, out                  # its customer's order, and no other
    assert "permission denied for table payment_cards" in out, out
    assert '"state":"revoked"' in out and '"reason":"released"' in out, out
    assert "does not exist" in out, out                                # the role went with the release
    out = run(wrapped)
    assert "support-bot" in out, out                                   # the SMTP login, unwrapped once
    assert "wrapping token is not valid" in out, out

    # The doc's JSON examples have the shape of what the broker served and wrote: the token response
    # (db.json, from the block) and the revocation entry of the release.
    import json

    answer_example, revocation_example = (json.loads(b) for i, b in
                                          fenced_blocks((REPO / "docs" / "vault.md").read_text())[0] if i == "json")
    assert _shape(answer_example) == _shape(json.loads((clone / "db.json").read_text()))
    url = f"http://127.0.0.1:{served.port}"
    size = int(httpx.get(url + "/v1/ledger/checkpoint").text.splitlines()[1])
    entries = [e["entry"] for e in httpx.get(url + "/v1/ledger/entries", params={"start": 0, "end": size}).json()[
        "entries"]]
    released = [e for e in entries if e["kind"] == "revocation" and e["revocation"]["reason"] == "released"]
    assert len(released) == 1 and _shape(revocation_example) == _shape(released[0])


def _shape(value: object) -> object:
    """The JSON structure of ``value``: members and types, not values."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return type(value).__name__


def _free_pair() -> int:
    """A free loopback port whose successor is free too (OpenBao's dev mode binds port + 1)."""
    from broker.vault.devserver import _free_port

    return _free_port()
