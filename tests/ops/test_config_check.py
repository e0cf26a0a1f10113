"""``nhi-broker config check``: every check, its message, and the exit code scripts rely on (0/1/3).

Backends are real: the machine's Redis, a JWKS served over HTTP by a thread in this test, and
addresses where nothing listens for the unreachable cases.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.attest.dev import DevIssuer
from tests.helpers import POLICIES, free_port
from tests.state.conftest import SHARED_REDIS

NHI = str(Path(sys.executable).with_name("nhi-broker"))


def check(tmp_path: Path, config: str | None = None, *extra: str, policies: Path = POLICIES,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = [NHI, "config", "check", "--data-dir", str(tmp_path / "data"), "--policies", str(policies), *extra]
    if config is not None:
        path = tmp_path / "broker.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env={**clean, **(env or {})})


def as_json(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {f"{c['group']}:{c['name']}": c["status"] for c in report["checks"]}


@pytest.fixture
def jwks_server() -> Iterator[str]:
    """A JWKS on loopback (the trial issuer's public key), as an identity provider would serve it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        body = json.dumps(DevIssuer.load_or_create(Path(d)).jwks()).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, payload = (200, body) if self.path == "/keys" else (404, b"{}")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def trust(url: str) -> str:
    return (f'[[trust]]\nissuer = "https://spire.example.org"\nkind = "spiffe-jwt"\naudience = "nhi-broker"\n'
            f'trust_domain = "example.org"\njwks_url = "{url}"\n')


def test_embedded_defaults_pass_with_warnings(tmp_path: Path) -> None:
    out = check(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ok    settings  embedded defaults and environment: valid"
    from broker.policy import load_policies

    sample = load_policies(POLICIES)
    counts = f"{len(sample.rules)} rules, {len(sample.registry)} workloads, version {sample.version}"
    assert any(line.startswith("ok    policies ") and counts in line for line in lines)
    assert any(line.startswith("warn  keys") and "created at first start" in line for line in lines)
    assert lines[-1] == "configuration ok (exit 0)"
    assert not (tmp_path / "data").exists()  # a check creates nothing


def test_refused_settings_exit_1_with_the_same_messages(tmp_path: Path) -> None:
    out = check(tmp_path, "prot = 1\n", "--format", "json")
    assert out.returncode == 1
    report = as_json(out)
    assert report["ok"] is False and report["exit"] == 1
    assert report["checks"][0]["detail"].endswith("unknown key 'prot'; did you mean 'port'? (valid keys: "
                                                  + report["checks"][0]["detail"].split("(valid keys: ")[1])
    assert ":1: unknown key 'prot'" in report["checks"][0]["detail"]


def test_a_refused_policy_set_exits_1(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies, ignore=shutil.ignore_patterns("vault"))
    with (policies / "policy.csv").open("a") as f:
        f.write("p, support-agent, orders-api, orders.read, customers/*/orders/*, , Deny, bad-effect, 60, jwt\n")
    out = check(tmp_path, None, "--format", "json", policies=policies)
    assert out.returncode == 1
    failed = [c for c in as_json(out)["checks"] if c["status"] == "fail"]
    assert [c["group"] for c in failed] == ["policies"]
    assert "policy.csv" in failed[0]["detail"] and "deny" in failed[0]["detail"].lower()


def test_a_key_readable_by_others_exits_1(tmp_path: Path) -> None:
    from broker.mint.keys import load_or_create_private_key

    key = tmp_path / "data" / "keys" / "ledger-key.pem"
    load_or_create_private_key(key, "EdDSA")
    key.chmod(0o644)
    out = check(tmp_path, None, "--format", "json")
    assert out.returncode == 1
    failed = [c for c in as_json(out)["checks"] if c["status"] == "fail"]
    assert failed == [{"group": "keys", "name": str(key), "status": "fail",
                       "detail": f"{key} is readable by others (mode 644); chmod 600 it"}]


def test_redis_reachable_and_unreachable(tmp_path: Path) -> None:
    ok = check(tmp_path, f'state_backend = "redis"\nredis_url = "{SHARED_REDIS}"\n', "--format", "json")
    assert ok.returncode == 0, ok.stdout
    assert statuses(as_json(ok))["backends:redis"] == "ok"
    port = free_port()
    down = check(tmp_path, f'state_backend = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\n')
    assert down.returncode == 3
    assert f"FAIL  backends  redis: redis://127.0.0.1:{port}/0: ConnectionError:" in down.stdout
    assert down.stdout.splitlines()[-1] == "configuration valid, but a backend is unreachable (exit 3)"
    offline = check(tmp_path, f'state_backend = "redis"\nredis_url = "redis://127.0.0.1:{port}/0"\n', "--offline")
    assert offline.returncode == 0  # --offline skips reachability


def test_a_redis_password_is_never_printed(tmp_path: Path) -> None:
    port = free_port()
    out = check(tmp_path, f'state_backend = "redis"\nredis_url = "redis://u:hunter2secret@127.0.0.1:{port}/0"\n')
    assert out.returncode == 3
    assert "hunter2secret" not in out.stdout + out.stderr
    assert f"redis://u:***@127.0.0.1:{port}/0" in out.stdout


def test_jwks_urls_are_fetched_and_parsed(tmp_path: Path, jwks_server: str) -> None:
    ok = check(tmp_path, trust(jwks_server + "/keys"), "--format", "json")
    assert ok.returncode == 0, ok.stdout
    report = as_json(ok)
    assert statuses(report)["backends:jwks https://spire.example.org"] == "ok"
    assert statuses(report)["trust:issuers"] == "ok"
    missing = check(tmp_path, trust(jwks_server + "/nope"))
    assert missing.returncode == 3
    assert f"FAIL  backends  jwks https://spire.example.org: {jwks_server}/nope answered HTTP 404" in missing.stdout


def test_a_missing_jwks_file_exits_1(tmp_path: Path) -> None:
    config = trust("x").replace('jwks_url = "x"', f'jwks_file = "{tmp_path / "absent.json"}"')
    out = check(tmp_path, config)
    assert out.returncode == 1
    assert f"FAIL  files     {tmp_path / 'absent.json'}: " in out.stdout
