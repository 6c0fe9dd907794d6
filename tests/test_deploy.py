"""The Kubernetes manifests of deploy/: every document parses, has the fields its kind needs, and agrees with
the others (labels, names, ports); and every metric the endpoint picker reads is in our server's /metrics.
No cluster runs here: what a cluster would refuse beyond these checks is not caught."""

import re
import time
from pathlib import Path

import pytest
import yaml

from backend.serve import PORTS
from client.api import generate

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
API_VERSIONS = {
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "PersistentVolumeClaim": "v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "InferencePool": "inference.networking.k8s.io/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "InferenceModelRewrite": "llm-d.ai/v1alpha2",
}
POOL_GROUP = "inference.networking.k8s.io"
SCORERS = {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"}
# the labels that the EPP's extractor reads from its LoRA and cache-info metrics (vLLM's names)
SPEC_LABELS = {
    "loraSpec": {"max_lora", "running_lora_adapters", "waiting_lora_adapters"},
    "cacheInfoSpec": {"block_size", "num_gpu_blocks"},
}


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [dict(d, _file=path.name) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d.get("metadata", {}).get("name") == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def container_ports(deployment: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}


def port_number(deployment: dict, port) -> int:
    return port if isinstance(port, int) else container_ports(deployment)[port]


def epp_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "lora-llm-epp")["data"]["config.yaml"])


def engine_config(docs: list[dict]) -> dict:
    """The extractor's engineConfigs entry for our pods' llm-d.ai/engine-type."""
    engine = pod_labels(one(docs, "Deployment", "lora-llm"))["llm-d.ai/engine-type"]
    extractor = next(p for p in epp_config(docs)["plugins"] if p["type"] == "core-metrics-extractor")
    return next(e for e in extractor["parameters"]["engineConfigs"] if e["name"] == engine)


def test_every_document_has_its_kinds_fields(docs):
    assert {d["kind"] for d in docs} == set(API_VERSIONS)
    for d in docs:
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], d["_file"]
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"], d["_file"]
    names = [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Kustomization"]
    assert len(names) == len(set(names))


def test_kustomization_lists_the_manifests(docs):
    (kustomization,) = [d for d in docs if d["kind"] == "Kustomization"]
    listed = set(kustomization["resources"])
    # the rollout example needs the llm-d CRDs, so it is applied on its own
    assert listed == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "adapter-rollout.yaml"}
    images = {c["image"].split(":")[0] for c in pod_spec(one(docs, "Deployment", "lora-llm"))["containers"]}
    assert {i["name"] for i in kustomization["images"]} <= images


def test_deployments_select_their_pods_and_probe_them(docs):
    for d in (d for d in docs if d["kind"] == "Deployment"):
        labels = pod_labels(d)
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
        for c in pod_spec(d)["containers"]:
            assert c["image"] and c["ports"] and c["readinessProbe"] and c["livenessProbe"], c["name"]


def test_lora_server(docs):
    server = one(docs, "Deployment", "lora-llm")
    spec = pod_spec(server)
    (c,) = spec["containers"]
    assert c["command"][-2:] == ["-m", "backend.serve"]
    # backend.serve's defaults, named as it names them (HTTP_PORT: http)
    assert container_ports(server) == {name.split("_")[0].lower(): port for name, port in PORTS.items()}

    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], port_number(server, ready["port"])) == ("/health", PORTS["OPENAI_PORT"])
    assert (live["path"], port_number(server, live["port"])) == ("/v2/health/live", PORTS["HTTP_PORT"])
    assert c["startupProbe"]["httpGet"] == live  # the liveness probe waits for the model to load
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod_labels(server)["llm-d.ai/engine-type"]

    # the model and adapters are on a volume, from the PVC defined beside it
    env = {e["name"]: e["value"] for e in c["env"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for var in ("LORA_BASE_MODEL", "LORA_ADAPTER_DIR"):
        (volume,) = [n for n, path in mounts.items() if env[var].startswith(path + "/")]
        claim = volumes[volume]["persistentVolumeClaim"]["claimName"]
        assert one(docs, "PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"]
    assert volumes[next(n for n, p in mounts.items() if p == "/dev/shm")]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", ["lora-llm", "lora-llm-epp"])
def test_services_select_their_deployments_pods(docs, name):
    service, deployment = one(docs, "Service", name), one(docs, "Deployment", name)
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    for p in service["spec"]["ports"]:
        assert port_number(deployment, p["targetPort"]), p


def test_inference_pool_targets_the_openai_port_and_the_epp(docs):
    pool = one(docs, "InferencePool", "lora-llm")
    server = one(docs, "Deployment", "lora-llm")
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels(server).items()
    assert pool["spec"]["targetPorts"] == [{"number": container_ports(server)["openai"]}]

    ref = pool["spec"]["endpointPickerRef"]
    epp_service = one(docs, "Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in epp_service["spec"]["ports"]]
    epp = one(docs, "Deployment", "lora-llm-epp")
    (c,) = pod_spec(epp)["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    assert args["pool-name"] == pool["metadata"]["name"] and args["pool-group"] == POOL_GROUP
    one(docs, "ServiceAccount", pod_spec(epp)["serviceAccountName"])
    # the config file is the ConfigMap's key, mounted where --config-file says
    (mount,) = [m for m in c["volumeMounts"] if args["config-file"].startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(epp)["volumes"] if v["name"] == mount["name"]]
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    assert args["config-file"].removeprefix(mount["mountPath"] + "/") in config_map["data"]

    rules = {r["apiGroups"][0]: set(r["resources"]) for r in one(docs, "Role", "lora-llm-epp")["rules"]}
    assert {"pods"} <= rules[""] and {"inferencepools"} <= rules[POOL_GROUP]
    binding = one(docs, "RoleBinding", "lora-llm-epp")
    assert binding["roleRef"]["name"] == "lora-llm-epp" and binding["subjects"][0]["name"] == "lora-llm-epp"


def test_httproute_and_rollout_name_the_pool(docs):
    route = one(docs, "HTTPRoute", "lora-llm")
    assert route["spec"]["parentRefs"]
    refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    assert refs == [{"group": POOL_GROUP, "kind": "InferencePool", "name": "lora-llm"}]
    one(docs, "InferencePool", refs[0]["name"])

    rewrite = one(docs, "InferenceModelRewrite", "pirate-rollout")["spec"]
    assert rewrite["poolRef"] == {"group": POOL_GROUP, "kind": "InferencePool", "name": "lora-llm"}
    (rule,) = rewrite["rules"]
    assert len(rule["targets"]) == 2 and all(t["modelRewrite"] and t["weight"] >= 1 for t in rule["targets"])


def test_epp_config(docs):
    config = epp_config(docs)
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")
    plugins = {p.get("name") or p["type"]: p for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    scoring = {p["pluginRef"]: p["weight"] for p in profile["plugins"]}
    assert {plugins[ref]["type"] for ref in scoring} == SCORERS and all(w > 0 for w in scoring.values())

    # the metrics come from Triton's metrics port, through the extractor that has our engine's names
    (source,) = config["dataLayer"]["sources"]
    assert plugins[source["pluginRef"]]["type"] == "metrics-data-source"
    metrics_port = container_ports(one(docs, "Deployment", "lora-llm"))["metrics"]
    assert plugins[source["pluginRef"]]["parameters"]["port"] == metrics_port
    assert [plugins[e["pluginRef"]]["type"] for e in source["extractors"]] == ["core-metrics-extractor"]
    specs = engine_config(docs)
    assert {k for k, v in specs.items() if k.endswith("Spec") and v} == {
        "queuedRequestsSpec",
        "runningRequestsSpec",
        "kvUsageSpec",
        *SPEC_LABELS,
    }


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """A metric spec as the EPP's extractor reads one: `name` or `name{label=value,...}`."""
    name, _, rest = spec.strip().partition("{")
    pairs = [p.split("=", 1) for p in rest.rstrip("}").split(",") if p.strip()]
    return name.strip(), {k.strip(): v.strip().strip('"') for k, v in pairs}


def series(text: str) -> dict[str, list[dict[str, str]]]:
    """Prometheus text: each metric name's series, as their label sets."""
    found: dict[str, list[dict[str, str]]] = {}
    for name, labels in re.findall(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? \S+$", text, re.M):
        found.setdefault(name, []).append(dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)))
    return found


def test_every_metric_the_epp_reads_is_served(docs, server):
    specs = {k: parse_spec(v) for k, v in engine_config(docs).items() if k.endswith("Spec") and v}
    # a request for an adapter, so that the adapter metrics have something to say
    generate(server.grpc_url, "lora_llm", input_ids=[1, 30, 31], lora_name="qv-r4", max_tokens=2, end_id=-1)

    def missing() -> list[str]:
        published = series(server.metrics())
        return [
            f"{key}: {name}{sorted(SPEC_LABELS.get(key, set()) | want.keys())}"
            for key, (name, want) in specs.items()
            if not any(
                want.items() <= s.items() and SPEC_LABELS.get(key, set()) <= s.keys() for s in published.get(name, [])
            )
        ]

    deadline = time.monotonic() + 30  # the model publishes its metrics every few steps
    while (absent := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not absent, f"not in the server's /metrics: {absent}"
