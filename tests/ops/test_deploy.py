"""The deployment files: Kubernetes manifests valid against the Kubernetes 1.37 JSON schemas (strict,
offline: the schemas ship inside the ``kubernetes-validate`` package), the ConfigMaps generated from
the sources they copy, the compose file's shape, and their settings run directly: ``config check``
passes and a broker starts with configured trust and no trial issuer. The Dockerfile's documented run
trusts no trial issuer, and its HEALTHCHECK follows the configured port."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import psycopg
import pytest
import yaml

from broker.config import Settings
from broker.config_explain import unknown_environment
from tests.helpers import POLICIES, REPO, LiveBroker, free_port
from tests.state.conftest import SHARED_REDIS

NHI = str(Path(sys.executable).with_name("nhi-broker"))
K8S = REPO / "deploy" / "kubernetes"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
LABELS = {"app.kubernetes.io/name": "nhi-broker"}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def resource(kind: str, name: str = "nhi-broker") -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_validate_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises ValidationError naming the path


def test_a_broken_manifest_is_caught() -> None:
    bad = json.loads(json.dumps(resource("Deployment")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"name": "http"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_configmaps_are_generated_from_their_sources(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import k8s_configmaps
    finally:
        sys.path.pop(0)
    rendered = [d for d in yaml.safe_load_all(k8s_configmaps.render()) if d]
    # The settings ConfigMap is exactly deploy/broker.toml and the trusted JWKS.
    assert resource("ConfigMap", "nhi-broker-config") == rendered[0], (
        "run: .venv/bin/python scripts/k8s_configmaps.py > deploy/kubernetes/configmap.yaml")
    # The policies ConfigMap carries the same files as policies/ (their content is the deployer's own:
    # regenerate it with the script when they change) and is a policy set the broker loads.
    from broker.policy import load_policies

    shipped = resource("ConfigMap", "nhi-broker-policies")["data"]
    assert sorted(shipped) == sorted(rendered[1]["data"])
    for name, text in shipped.items():
        (tmp_path / name).write_text(text)
    assert load_policies(tmp_path).rules


def test_the_deployment_is_hardened_and_probed() -> None:
    deployment = resource("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (broker,) = pod["containers"]
    assert spec["replicas"] >= 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    for container in [broker, *pod["initContainers"]]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
    assert broker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert broker["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "nhi-broker-keys"
    assert volumes["policies"]["configMap"]["name"] == "nhi-broker-policies"
    assert spec["selector"]["matchLabels"] == LABELS == spec["template"]["metadata"]["labels"]
    assert resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == LABELS
    assert resource("PodDisruptionBudget")["spec"]["minAvailable"] < spec["replicas"]
    assert resource("Service")["spec"]["selector"] == LABELS


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "compose.yaml").read_text())  # type: ignore[no-any-return]


def test_compose_runs_two_brokers_on_the_shared_engines() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "openbao", "init", "broker-a", "broker-b"} <= set(services)
    for name in ("broker-a", "broker-b"):
        broker = services[name]
        assert broker["read_only"] is True and broker["cap_drop"] == ["ALL"]
        assert broker["depends_on"]["init"]["condition"] == "service_completed_successfully"
        assert "keys:/var/lib/nhi-broker/keys" in broker["volumes"]  # one key set for both
    assert services["init"]["command"][-1] == "nhi-broker db upgrade && nhi-broker keys init"


def _env(names: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in names.items() if k.startswith("NHI_BROKER_")}


def test_every_variable_the_deployments_set_is_a_setting() -> None:
    compose_env = _env(compose()["x-broker"]["environment"])
    k8s_env = {e["name"]: "x" for e in resource("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    for env in (compose_env, k8s_env):
        assert unknown_environment(Settings, env) == {}
        assert "NHI_BROKER_UNSAFE_TRIAL_ISSUERS" not in env


@pytest.fixture
def ledger_db() -> Iterator[str]:
    name = f"ops_deploy_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_deployed_settings_run_directly(tmp_path: Path, ledger_db: str) -> None:
    # deploy/broker.toml as the containers read it, with only the container paths mapped to this
    # checkout, and the compose environment with its hosts mapped to this machine's servers.
    text = (REPO / "deploy" / "broker.toml").read_text()
    text = text.replace('"/var/lib/nhi-broker"', f'"{tmp_path / "data"}"')
    text = text.replace('"/etc/nhi-broker/policies"', f'"{POLICIES}"')
    text = text.replace('"/etc/nhi-broker/trust/k8s-jwks.json"', f'"{REPO / "deploy" / "trust" / "k8s-jwks.json"}"')
    text = re.sub(r'(?m)^host = "0\.0\.0\.0".*$', 'host = "127.0.0.1"', text)  # bind loopback in tests
    config = tmp_path / "broker.toml"
    config.write_text(text)
    env = _env(compose()["x-broker"]["environment"])
    env.pop("NHI_BROKER_VAULT__ADDR")  # OpenBao is exercised by tests/vault; not needed to start
    env.pop("NHI_BROKER_VAULT__TOKEN_FILE")
    env.update({"NHI_BROKER_CONFIG": str(config), "NHI_BROKER_LEDGER_URL": ledger_db,
                "NHI_BROKER_REDIS_URL": SHARED_REDIS, "NHI_BROKER_REDIS_PREFIX": f"ops-{uuid.uuid4().hex[:8]}:"})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([NHI, *args], capture_output=True, text=True, env={**clean, **env}, timeout=120)

    upgrade = run("db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    keys = run("keys", "init")
    assert keys.returncode == 0, keys.stderr
    check = run("config", "check", "--format", "json")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert {c["name"] for c in report["checks"] if c["group"] == "backends"} >= {"redis", "postgresql"}
    assert not any(c["name"] == "trial issuer" for c in report["checks"])

    broker = LiveBroker(tmp_path / "data", POLICIES, workers=1, config=config, env=env)
    try:
        metadata = httpx.get(broker.url + "/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == "https://broker.example.org"
    finally:
        out = broker.stop()
    assert "  trusted issuer    https://kubernetes.default.svc.cluster.local (kubernetes)" in out
    assert "  trial issuer      OFF (unsafe_trial_issuers = false)" in out
    assert not (tmp_path / "data" / "dev-issuer-key.pem").exists()


def dockerfile_env() -> dict[str, str]:
    text = (REPO / "Dockerfile").read_text()
    block = text[text.rindex("ENV "):].split("\n\n")[0]
    block = block[: block.index("\nUSER")]
    return dict(re.findall(r"(NHI_BROKER_\w+)=(\S+)", block))


def test_the_image_run_as_documented_trusts_no_trial_issuer() -> None:
    env = {**dockerfile_env(), "NHI_BROKER_PUBLIC_URL": "https://broker.example.org"}
    assert env["NHI_BROKER_HOST"] == "0.0.0.0"  # noqa: S104 - read from the Dockerfile, not bound here
    settings = Settings(**{k[len("NHI_BROKER_"):].lower(): v for k, v in env.items()})  # type: ignore[arg-type]
    assert settings.trial_issuers_enabled is False


def test_the_healthcheck_follows_the_configured_port(tmp_path: Path) -> None:
    assert 'CMD ["nhi-broker", "healthcheck"]' in (REPO / "Dockerfile").read_text()
    broker = LiveBroker(tmp_path / "data")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NHI_BROKER_")}
    try:
        healthy = subprocess.run([NHI, "healthcheck"], env={**clean, "NHI_BROKER_PORT": str(broker.port)},
                                 capture_output=True, text=True, timeout=60)
        assert healthy.returncode == 0, healthy.stderr
        ready = subprocess.run([NHI, "healthcheck", "--ready"], env={**clean, "NHI_BROKER_PORT": str(broker.port)},
                               capture_output=True, text=True, timeout=60)
        assert ready.returncode == 0, ready.stderr
    finally:
        broker.stop()
    port = free_port()
    down = subprocess.run([NHI, "healthcheck"], env={**clean, "NHI_BROKER_PORT": str(port)},
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1
    assert down.stderr.startswith(f"unhealthy: http://127.0.0.1:{port}/healthz: ConnectError")
