"""Configuration mistakes and the message each one gets: file, line, key, nearest valid key, what it must be.

Each row is one mistake an operator makes, the exact lines the broker must answer with, and nothing
else (a raw pydantic dump or a URL would fail the test).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from broker.config import Settings, load_settings
from broker.errors import ConfigError
from tests.helpers import POLICIES, SUPPORT, LiveBroker, exchange_form, free_port, intent

NHI = str(Path(sys.executable).with_name("nhi-broker"))

# (name, TOML text, environment, the problem lines expected, in order)
CASES = [
    ("unknown top-level key", 'data_dir = "/tmp/x"\nprot = 8080\n', {},
     ["{f}:2: unknown key 'prot'; did you mean 'port'?"]),
    ("unknown key in an array of tables",
     '[[trust]]\nissuer = "https://k8s"\nkind = "kubernetes"\naudience = "nhi-broker"\n'
     'trust_domain = "example.org"\njwks_ulr = "https://k8s/keys"\n', {},
     ["{f}:6: unknown key 'trust[0].jwks_ulr'; did you mean 'jwks_url'?"]),
    ("unknown key in a table", "[approvals]\npoll_intervall = 5\n", {},
     ["{f}:2: unknown key 'approvals.poll_intervall'; did you mean 'poll_interval'?"]),
    ("value out of range", "[approvals]\npoll_interval = 0\n", {},
     ["{f}:2: approvals.poll_interval: Input should be greater than or equal to 1 (got 0); "
      "must be integer (>= 1, <= 60)"]),
    ("not one of the choices", 'state_backend = "redsi"\n', {},
     ["{f}:1: state_backend: Input should be 'sqlite' or 'redis' (got 'redsi'); must be \"sqlite\" | \"redis\""]),
    ("wrong type", 'port = "eighty"\n', {},
     ["{f}:1: port: Input should be a valid integer, unable to parse string as an integer (got 'eighty'); "
      "must be integer (>= 1, <= 65535)"]),
    ("a validator's rule, in the second table of an array",
     '[[operators]]\nname = "alice"\nrole = "admin"\ntoken_sha256 = "' + "a" * 64 + '"\n'
     '[[operators]]\nname = "bob"\nrole = "approver"\n', {},
     ["{f}:5: operators[1]: an operator needs exactly one of token_sha256 or spiffe_id"]),
    ("a missing required key", '[vault]\ntoken_file = "/run/secrets/t"\n', {},
     ["{f}:1: vault.addr: is required but missing; must be string"]),
    ("a mistyped environment variable", "", {"NHI_BROKER_PORTT": "9090"},
     ["environment variable NHI_BROKER_PORTT: names no setting; did you mean 'NHI_BROKER_PORT'? "
      "(see docs/configuration.md; unset it or fix its name)"]),
    ("a mistyped nested environment variable", "", {"NHI_BROKER_VAULT__ADR": "http://127.0.0.1:8200"},
     ["environment variable NHI_BROKER_VAULT__ADR: names no setting; did you mean 'NHI_BROKER_VAULT__ADDR'? "
      "(see docs/configuration.md; unset it or fix its name)"]),
    ("a bad value in an environment variable", "", {"NHI_BROKER_WORKERS": "lots"},
     ["environment variable NHI_BROKER_WORKERS: workers: Input should be a valid integer, unable to parse "
      "string as an integer (got 'lots'); must be integer (>= 1, <= 64)"]),
    ("the environment overrides the file, and is named as the source", "port = 8081\n", {"NHI_BROKER_PORT": "0"},
     ["environment variable NHI_BROKER_PORT: port: Input should be greater than or equal to 1 (got '0'); "
      "must be integer (>= 1, <= 65535)"]),
    ("trial issuers explicitly on next to configured trust",
     'unsafe_trial_issuers = true\n[[trust]]\nissuer = "https://spire"\nkind = "spiffe-jwt"\n'
     'audience = "nhi-broker"\ntrust_domain = "example.org"\njwks_url = "https://spire/keys"\n', {},
     ["{f}:1: unsafe_trial_issuers is for trials only and cannot be combined with configured trust"]),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("NHI_BROKER_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("toml", "env", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_mistake_gets_a_precise_message(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, toml: str, env: dict[str, str], expected: list[str]
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(toml)
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"invalid configuration ({len(expected)} problem{'s' if len(expected) > 1 else ''}):"
    got = [line.strip() for line in lines[1:]]
    assert len(got) == len(expected), got
    for line, want in zip(got, expected, strict=True):
        # An unknown key's line goes on with the list of valid keys there (checked below).
        assert line == want.format(f=path) or line.startswith(want.format(f=path) + " (valid keys"), line
    assert "pydantic" not in str(caught.value) and "http" not in str(caught.value).replace("https://", "")


def test_every_problem_is_listed_at_once(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('prot = 1\nstate_backend = "x"\n')
    clean_env.setenv("NHI_BROKER_AUDIENSE", "x")
    with pytest.raises(ConfigError, match=r"\(3 problems\)") as caught:
        load_settings(path)
    text = str(caught.value)
    assert "NHI_BROKER_AUDIENSE" in text and f"{path}:1: unknown key 'prot'" in text and f"{path}:2:" in text


@pytest.mark.parametrize(
    ("toml", "line", "column"),
    [("a = 1\nb = = 2\n", 2, 5), ('[approvals\npoll_interval = 5\n', 1, 11), ('x = "unterminated\n', 1, 18)],
    ids=["double equals", "unclosed table header", "unterminated string"],
)
def test_toml_syntax_errors_name_the_file_and_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, toml: str, line: int, column: int
) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value).startswith(f"{path}:{line}: TOML syntax error at column {column}: ")


def test_a_missing_file_is_named(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"^configuration file .*nope\.toml does not exist$"):
        load_settings(tmp_path / "nope.toml")
    clean_env.setenv("NHI_BROKER_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml \(from NHI_BROKER_CONFIG\) does not exist"):
        load_settings()


def test_the_cli_prints_the_lines_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('toke_ttl = 60\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    out = subprocess.run([NHI, "serve", "--config", str(path), "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == (f"nhi-broker: invalid configuration (1 problem):\n  {path}:1: unknown key 'toke_ttl'; "
                          "did you mean 'token_ttl'? (valid keys: " + ", ".join(sorted(Settings.model_fields))
                          + ")\n")
    assert not (tmp_path / "d").exists()  # nothing created for a refused configuration


# -- trial issuers --------------------------------------------------------------------------------

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - only compared, never bound here
TRUST = {"issuer": "https://spire.example.org", "kind": "spiffe-jwt", "audience": "nhi-broker",
         "trust_domain": "example.org", "jwks_url": "https://spire.example.org/keys"}


@pytest.mark.parametrize(
    ("settings", "enabled"),
    [
        ({}, True),
        ({"host": "::1"}, True),
        ({"public_url": "http://localhost:8080"}, True),
        ({"host": ALL_INTERFACES}, False),  # the Docker image's binding
        ({"host": "10.1.2.3"}, False),
        ({"public_url": "https://broker.example.org"}, False),  # behind a proxy on the same host
        ({"trust": [TRUST]}, False),
        ({"host": ALL_INTERFACES, "unsafe_trial_issuers": True}, True),
        ({"unsafe_trial_issuers": False}, False),
    ],
    ids=["defaults", "ipv6 loopback", "loopback public url", "all interfaces", "a LAN address", "https public url",
         "trust configured", "explicitly on", "explicitly off"],
)
def test_trial_issuers_only_on_loopback_defaults_or_when_asked(settings: dict[str, object], enabled: bool) -> None:
    assert Settings(**settings).trial_issuers_enabled is enabled  # type: ignore[arg-type]


def test_docker_style_start_trusts_no_trial_issuer_and_says_so(tmp_path: Path) -> None:
    # As the Dockerfile's documented run: only the public URL set (the test binds loopback, not every
    # interface; the table above shows that binding 0.0.0.0 alone turns the trial issuer off too).
    broker = LiveBroker(tmp_path / "data", env={"NHI_BROKER_PUBLIC_URL": "https://broker.example.org"})
    try:
        from broker.attest.dev import DevIssuer
        from broker.clock import SystemClock

        identity = DevIssuer.load_or_create(tmp_path / "trial").mint(SUPPORT, "nhi-broker", ttl=60,
                                                                    clock=SystemClock())
        details = intent("orders.read", "customers/c-42/orders/ord-1001", customer="c-42")
        r = httpx.post(broker.url + "/v1/token", data=exchange_form(identity, "orders-api", details))
        assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text
        assert not (tmp_path / "data" / "dev-issuer-key.pem").exists()
    finally:
        out = broker.stop()
    assert ("  trial issuer      OFF (not on loopback embedded defaults; set unsafe_trial_issuers = true "
            "to try it anyway)") in out
    assert "  WARNING           no [[trust]] issuer is configured: every token exchange is refused" in out


# -- binding before recording ---------------------------------------------------------------------


def test_serve_on_a_port_in_use_prints_no_banner_and_records_nothing(tmp_path: Path) -> None:
    from broker.ledger import SqliteLedgerStorage

    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run([NHI, "serve", "--port", str(port), "--data-dir", str(data),
                              "--policies", str(POLICIES)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "listening" not in out.stdout + out.stderr
    assert out.stderr.strip().endswith(
        f"nhi-broker: cannot listen on 127.0.0.1:{port}: the address is already in use "
        "(nothing was started or recorded)")
    ledger_file = data / "ledger.sqlite3"
    if ledger_file.exists():
        storage = SqliteLedgerStorage(ledger_file)
        try:
            assert storage.size() == 0
        finally:
            storage.close()
