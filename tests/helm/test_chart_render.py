"""Render helm/llm-sidecar with real Helm, validate every manifest, assert the invariants."""

from __future__ import annotations

import copy
import hashlib
import posixpath
import re
from typing import Any

import pytest
import yaml
from chartkit import (
    CA_SECRET,
    CASES,
    CHART,
    INTERCEPT,
    SECRET,
    Rendered,
    RenderFn,
    kn,
    parse_manifests,
    require_module,
)

KUBE_1_29 = "1.29.0"
PROMETHEUS_OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}

# --- invariants -------------------------------------------------------------------------


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def mounts_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def find_sidecar(spec: dict[str, Any], v: dict[str, Any]) -> dict[str, Any]:
    name = v["sidecar"]["name"]
    init = [c for c in spec.get("initContainers", []) if c["name"] == name]
    main = [c for c in spec["containers"] if c["name"] == name]
    if v["sidecar"]["native"]:
        assert main == [], "a native sidecar must not also be a classic container"
        assert len(init) == 1, "native sidecar missing from initContainers"
        assert init[0].get("restartPolicy") == "Always"
        return init[0]
    assert init == [], "a classic sidecar must not be an init container"
    assert spec["containers"][0]["name"] == name, "a classic sidecar must be the first container"
    assert "restartPolicy" not in spec["containers"][0]
    return spec["containers"][0]


def check_probes(sidecar: dict[str, Any], v: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {v["sidecar"]["adminPortName"]: v["sidecar"]["ports"]["admin"]}, (
        "only the admin port is exposed: the proxy listens on 127.0.0.1"
    )
    want = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in want.items():
        get = sidecar[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"]) == v["sidecar"]["ports"]["admin"], f"{probe} not on admin"


def check_security(container: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def check_pod(
    pod: dict[str, Any], v: dict[str, Any], config_map: dict[str, Any], config_text: str
) -> None:
    """The invariants of any pod spec carrying the sidecar (ours or a parent chart's)."""
    spec = pod["spec"]
    s = v["sidecar"]
    sidecar = find_sidecar(spec, v)
    check_probes(sidecar, v)
    check_security(sidecar)
    res = sidecar["resources"]
    assert res["requests"]["cpu"] and res["requests"]["memory"] and res["limits"]["memory"]

    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    for c in containers_of(spec):
        for m in c.get("volumeMounts", []):
            assert "subPath" not in m and "subPathExpr" not in m, f"{c['name']}: subPath"
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"

    # Config: the ConfigMap, mounted as a directory, holding the file --config names.
    args = sidecar["args"]
    config_path = args[args.index("--config") + 1]
    config_mounts = [
        m
        for m in sidecar["volumeMounts"]
        if volumes[m["name"]].get("configMap", {}).get("name") == config_map["metadata"]["name"]
    ]
    assert len(config_mounts) == 1, "config ConfigMap not mounted into the sidecar"
    assert posixpath.dirname(config_path) == config_mounts[0]["mountPath"]
    assert config_mounts[0].get("readOnly") is True
    assert posixpath.basename(config_path) in config_map["data"]
    assert args[args.index("--log-level") + 1] == s["logLevel"]

    # Writable dirs are emptyDirs: /tmp and the audit dir.
    writable = {m["mountPath"] for m in sidecar["volumeMounts"] if "emptyDir" in volumes[m["name"]]}
    assert {"/tmp", s["auditDir"]} <= writable

    # Rolling on config change only when asked, and then with the exact config's hash.
    annotations = pod["metadata"].get("annotations", {})
    if v["rolloutOnConfigChange"]:
        digest = hashlib.sha256(config_text.rstrip("\n").encode()).hexdigest()
        assert annotations["checksum/llm-sidecar-config"] == digest
    else:
        assert not any(k.startswith("checksum/") for k in annotations)

    # Shutdown: the kubelet waits long enough for the drain (+ the classic preStop).
    grace = v["config"].get("shutdown_grace_s", 30)
    if s["native"]:
        assert "lifecycle" not in sidecar, "a native sidecar stops after the app by itself"
    else:
        life = sidecar["lifecycle"]
        assert life["preStop"]["exec"]["command"] == [
            "sleep",
            str(s["classic"]["preStopSleepSeconds"]),
        ]
        grace += s["classic"]["preStopSleepSeconds"]
        hold = "postStart" in life
        assert hold is s["classic"]["holdAppUntilReady"]
        if hold:
            script = life["postStart"]["exec"]["command"][-1]
            assert f"127.0.0.1:{s['ports']['admin']}/readyz" in script
    assert spec["terminationGracePeriodSeconds"] >= grace

    # Provider keys: a Secret volume in the sidecar only, at the path the config names.
    secret_name = v["secrets"]["existingSecret"]
    key_volumes = [n for n, vol in volumes.items() if secret_name and secret_of(vol) == secret_name]
    if secret_name:
        assert len(key_volumes) == 1
        mount = mounts_of(sidecar)[key_volumes[0]]
        assert mount["mountPath"] == v["secrets"]["mountPath"] and mount["readOnly"] is True
        for upstream, h in v["secrets"]["headers"].items():
            if upstream in v["config"]["upstreams"]:
                ref = "${file:" + posixpath.join(mount["mountPath"], h["key"]) + "}"
                assert ref in config_text, f"config does not read {h['key']} from the Secret"
    else:
        assert key_volumes == [] and "${file:" not in config_text

    # The app: env wired, and no secret material reachable.
    others = [c for c in containers_of(spec) if c is not sidecar]
    app = next(c for c in spec["containers"] if c is not sidecar)
    check_app_env(env_of(app), v)
    for c in others:
        assert "envFrom" not in c or all("secretRef" not in e for e in c["envFrom"])
        for e in c.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}), f"{c['name']}: {e['name']}"
        for name in mounts_of(c):
            secret = secret_of(volumes[name])
            if secret is None:
                continue
            # Only the interception CA's certificate may reach another container.
            assert secret == CA_SECRET and v["intercept"]["enabled"], f"{c['name']} sees {secret}"
            items = volumes[name]["secret"]["items"]
            assert [i["key"] for i in items] == [v["intercept"]["certKey"]], (
                f"{c['name']} can read more of {secret} than the CA certificate"
            )
    check_intercept(spec, sidecar, app, v, config_text)


def secret_of(volume: dict[str, Any]) -> str | None:
    if "secret" in volume:
        return str(volume["secret"]["secretName"])
    for source in volume.get("projected", {}).get("sources", []):
        if "secret" in source:
            return str(source["secret"]["name"])
    return None


def check_app_env(env: dict[str, str], v: dict[str, Any]) -> None:
    proxy = f"http://127.0.0.1:{v['sidecar']['ports']['proxy']}"
    proxy_vars = {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"}
    if v["app"]["mode"] == "baseUrl":
        assert env["OPENAI_BASE_URL"] == f"{proxy}/openai/v1"
        assert env["ANTHROPIC_BASE_URL"] == f"{proxy}/anthropic"
        assert not proxy_vars & env.keys()
        return
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == proxy, name
    assert env["NO_PROXY"] == env["no_proxy"]
    no_proxy = env["NO_PROXY"].split(",")
    domain = v["app"]["clusterDomain"]
    for entry in ("localhost", "127.0.0.1", ".svc", f".{domain}", *v["app"]["serviceCIDRs"]):
        assert entry in no_proxy, entry
    assert set(v["app"]["podCIDRs"]) | set(v["app"]["noProxy"]) <= set(no_proxy)
    assert "OPENAI_BASE_URL" not in env


def check_intercept(
    spec: dict[str, Any],
    sidecar: dict[str, Any],
    app: dict[str, Any],
    v: dict[str, Any],
    config_text: str,
) -> None:
    env = env_of(app)
    trust_vars = {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"}
    config = yaml.safe_load(config_text)
    ic = v["intercept"]
    if not ic["enabled"]:
        assert not trust_vars & env.keys()
        assert "intercept" not in config
        return
    assert trust_vars <= env.keys()
    # The sidecar has cert and key where the config says.
    ca_mount = mounts_of(sidecar)[f"{v['sidecar']['name']}-ca"]["mountPath"]
    assert config["intercept"]["ca_cert"] == posixpath.join(ca_mount, "ca.crt")
    assert config["intercept"]["ca_key"] == posixpath.join(ca_mount, "ca.key")
    assert config["intercept"]["hosts"] == ic["hosts"]
    # The app's trust files live in a directory mounted into the app.
    app_dirs = {m["mountPath"] for m in app.get("volumeMounts", [])}
    for name in trust_vars:
        assert posixpath.dirname(env[name]) in app_dirs, name
    bundle = "ca-bundle.crt" if ic["combineSystemCAs"] else "ca.crt"
    assert posixpath.basename(env["SSL_CERT_FILE"]) == bundle
    init_names = [c["name"] for c in spec.get("initContainers", [])]
    trust = f"{v['sidecar']['name']}-trust"
    assert (trust in init_names) is ic["combineSystemCAs"]
    if ic["combineSystemCAs"]:
        init = next(c for c in spec["initContainers"] if c["name"] == trust)
        check_security(init)
        assert init_names.index(trust) == 0, "the bundle must exist before anything starts"


def config_of(r: Rendered) -> tuple[dict[str, Any], str]:
    cms = [d for d in r.of_kind("ConfigMap") if "config.yaml" in d.get("data", {})]
    assert len(cms) == 1
    return cms[0], cms[0]["data"]["config.yaml"]


def merged(chart: Any, values: dict[str, Any]) -> dict[str, Any]:
    return dict(chart.merge_values(copy.deepcopy(values)))


# --- Kubernetes schema validation --------------------------------------------------------


@pytest.fixture(scope="module")
def kv() -> Any:
    return require_module("kubernetes_validate")


def kube_versions(kv: Any) -> list[str]:
    return [KUBE_1_29, kv.latest_version()]


def validate_all(kv: Any, r: Rendered) -> None:
    assert r.docs
    for doc in r.docs:
        if doc["kind"] in PROMETHEUS_OPERATOR_KINDS:
            check_operator_object(doc)
            continue
        for version in kube_versions(kv):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{kn(doc)} invalid for Kubernetes {version}: {path}: {e.message}")


def check_operator_object(doc: dict[str, Any]) -> None:
    """No published schema in kubernetes-validate: check the fields the operator needs."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    if doc["kind"] == "PrometheusRule":
        assert spec["groups"] and all(g["name"] and g["rules"] for g in spec["groups"])
        for rule in (r for g in spec["groups"] for r in g["rules"]):
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
        return
    endpoints = spec["podMetricsEndpoints" if doc["kind"] == "PodMonitor" else "endpoints"]
    assert endpoints and all(e["port"] and e["path"] == "/metrics" for e in endpoints)
    assert spec["selector"]["matchLabels"]


# --- tests ---------------------------------------------------------------------------------


def test_lint_is_clean(helm: Any) -> None:
    everything = CASES["everything-classic"]
    for values in ({}, everything):
        for kube in (None, "v1.29.0"):
            report = helm.lint(CHART, values, strict=True, kube_version=kube)
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert problems == [] and report["errors"] == [], report


@pytest.mark.parametrize("case", CASES)
def test_render_validates_and_keeps_invariants(
    case: str, chart: Any, render: RenderFn, kv: Any
) -> None:
    values = CASES[case]
    v = merged(chart, values)
    r = render(values)
    validate_all(kv, r)

    config_map, config_text = config_of(r)
    config = yaml.safe_load(config_text)
    assert config["listen"] == {"proxy": "127.0.0.1:4000", "admin": "0.0.0.0:9901"}

    deployments = r.of_kind("Deployment")
    assert len(deployments) == int(v["example"]["enabled"])
    for d in deployments:
        check_pod(d["spec"]["template"], v, config_map, config_text)
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod_labels.items()
        for c in containers_of(d["spec"]["template"]["spec"]):
            check_security(c)
        if v["imagePullSecrets"]:
            pull = d["spec"]["template"]["spec"]["imagePullSecrets"]
            assert pull == [{"name": n} for n in v["imagePullSecrets"]]

    check_service_and_monitors(r, v)
    check_test_hook(r, v)
    check_observability(r, v)
    assert not any(d["kind"] == "Secret" for d in r.docs), "the chart never creates a Secret"


def check_service_and_monitors(r: Rendered, v: dict[str, Any]) -> None:
    services = r.of_kind("Service")
    assert len(services) == int(v["service"]["enabled"])
    sidecar_pods = [d["spec"]["template"] for d in r.of_kind("Deployment")]
    for svc in services:
        selector = svc["spec"]["selector"]
        for pod in sidecar_pods:
            assert selector.items() <= pod["metadata"]["labels"].items(), "Service misses pods"
            sidecar = find_sidecar(pod["spec"], v)
            names = {p["name"] for p in sidecar["ports"]}
            assert svc["spec"]["ports"][0]["targetPort"] in names
    monitors = [d for d in r.docs if d["kind"] in {"PodMonitor", "ServiceMonitor"}]
    if not v["monitoring"]["enabled"]:
        assert monitors == []
        return
    assert [m["kind"] for m in monitors] == [v["monitoring"]["kind"]]
    mon = monitors[0]
    match = mon["spec"]["selector"]["matchLabels"]
    if mon["kind"] == "PodMonitor":
        for pod in sidecar_pods:
            assert match.items() <= pod["metadata"]["labels"].items()
        port = mon["spec"]["podMetricsEndpoints"][0]["port"]
        assert port == v["sidecar"]["adminPortName"]
    else:
        (svc,) = services
        assert match.items() <= svc["metadata"]["labels"].items()
        assert mon["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def check_test_hook(r: Rendered, v: dict[str, Any]) -> None:
    pods = r.of_kind("Pod")
    if not (v["tests"]["enabled"] and v["service"]["enabled"]):
        assert pods == []
        return
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    check_security(c)
    script = c["command"][-1]
    svc = r.one("Service")
    port = svc["spec"]["ports"][0]["port"]
    assert f"http://{svc['metadata']['name']}.apps.svc:{port}/readyz" in script


def check_observability(r: Rendered, v: dict[str, Any]) -> None:
    rules = r.of_kind("PrometheusRule")
    assert len(rules) == int(v["prometheusRule"]["enabled"])
    dashboards = [
        d for d in r.of_kind("ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard")
    ]
    assert len(dashboards) == int(v["grafanaDashboard"]["enabled"])
    for d in dashboards:
        assert d["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert d["data"] and all(k.endswith(".json") for k in d["data"])


def test_native_sidecar_precedes_nothing_but_trust_bundle(render: RenderFn) -> None:
    """The app starts after the sidecar's startupProbe: it must be an init container."""
    r = render(CASES["intercept"])
    spec = r.one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["llm-sidecar-trust", "llm-sidecar"]
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_image_defaults_to_chart_app_version(chart: Any, render: RenderFn) -> None:
    app_version = chart.metadata["appVersion"]
    spec = render().one("Deployment")["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["image"] == f"llm-sidecar:{app_version}"
    pinned = render({"image": {"repository": "reg.example/llm-sidecar", "tag": "9.9.9"}})
    (sidecar,) = pinned.one("Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert sidecar["image"] == "reg.example/llm-sidecar:9.9.9"


def test_secret_headers_do_not_override_explicit_config(render: RenderFn) -> None:
    values = {
        "secrets": {"existingSecret": SECRET},
        "config": {"upstreams": {"openai": {"headers": {"Authorization": "Bearer ${OPENAI_KEY}"}}}},
    }
    _, text = config_of(render(values))
    config = yaml.safe_load(text)
    assert config["upstreams"]["openai"]["headers"] == {"Authorization": "Bearer ${OPENAI_KEY}"}
    assert "anthropic-api-key}" in config["upstreams"]["anthropic"]["headers"]["x-api-key"]


def test_config_numbers_survive_rendering(render: RenderFn) -> None:
    """Helm's float64 values must not turn big integers into 1e+08 in the config."""
    audit = {"path": "/var/log/llm-sidecar/audit.jsonl", "max_bytes": 104857600, "backups": 5}
    _, text = config_of(render({"config": {"audit": audit}}))
    assert yaml.safe_load(text)["audit"] == audit


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"terminationGracePeriodSeconds": 20}, "terminationGracePeriodSeconds (20) must be >="),
        (
            {"sidecar": {"native": False}, "terminationGracePeriodSeconds": 35},
            "+ sidecar.classic.preStopSleepSeconds (40)",
        ),
        ({"intercept": INTERCEPT}, "intercept.enabled needs app.mode=proxy"),
        ({"config": {"listen": {"proxy": "0.0.0.0:4000"}}}, "config.listen is set by the chart"),
        (
            {"app": {"mode": "proxy"}, "intercept": INTERCEPT, "config": {"intercept": {}}},
            "config.intercept is set by the chart",
        ),
        (
            {
                "monitoring": {"enabled": True, "kind": "ServiceMonitor"},
                "service": {"enabled": False},
            },
            "needs service.enabled=true",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(
    helm: Any, render: RenderFn, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(values)


def test_notes_explain_how_to_reach_the_dashboard(render: RenderFn) -> None:
    notes = render().notes
    assert "kubectl -n apps port-forward deploy/demo-llm-sidecar-example 9901:9901" in notes
    assert "http://127.0.0.1:9901/dashboard" in notes
    assert "helm test demo -n apps" in notes
    bare = render(CASES["bare"]).notes
    assert "port-forward pod/<POD> 9901:9901" in bare and "helm test" not in bare


def test_release_named_like_the_chart_is_not_doubled(render: RenderFn) -> None:
    r = render(name="llm-sidecar")
    assert r.one("ConfigMap", "-config")["metadata"]["name"] == "llm-sidecar-config"


# --- use from another chart ----------------------------------------------------------------


def test_parent_chart_lints_clean(helm: Any, parent_dir: Any) -> None:
    report = helm.lint(parent_dir, strict=True, kube_version="v1.29.0")
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("case", ["default", "classic", "intercept", "everything-classic"])
def test_parent_chart_injects_the_sidecar(
    case: str, parent_chart: Any, chart: Any, kv: Any
) -> None:
    values = CASES[case]
    v = merged(chart, {**values, "example": {"enabled": False}})
    out = parent_chart.render(values={"llmSidecar": values}, name="shop", namespace="apps")
    r = parse_manifests(out)
    validate_all(kv, r)
    config_map, config_text = config_of(r)
    app = r.one("Deployment", "-my-app")
    check_pod(app["spec"]["template"], v, config_map, config_text)
    assert [d["metadata"]["name"] for d in r.of_kind("Deployment")] == ["shop-my-app"]
    check_service_and_monitors(r, v)
