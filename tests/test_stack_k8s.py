"""deploy/k8s: every manifest validates against the Kubernetes API schemas (kubernetes-validate,
offline, strict: unknown fields are errors), and the fields that make the probe work are there:
the canary pushes and exports OTLP, worker and canary sinks are reachable at the pod IP, Services
select their pods, the scrape example passes promtool."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
KUBERNETES_VERSION = "1.30.0"
_CI = os.environ.get("CI") == "true"


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                out.append((path.name, doc))
    return out


def _find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(doc["spec"]["template"]["spec"])


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (c,) = _pod_spec(doc)["containers"]
    return dict(c)


def _env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def _config() -> dict[str, str]:
    return dict(_find("ConfigMap", "probe-config")["data"])


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    docs = _docs()
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["ConfigMap", "CronJob", "Deployment", "Service"], kinds
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_the_validator_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    worker = _find("Deployment", "probe-locust-worker")
    typo = yaml.safe_load(yaml.safe_dump(worker))
    typo["spec"]["replicaz"] = typo["spec"].pop("replicas")
    wrong = yaml.safe_load(yaml.safe_dump(worker))
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8766"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_canary_cronjob_pushes_to_the_pushgateway_and_exports_otlp() -> None:
    cron = _find("CronJob", "probe-canary")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    c = _container(cron)
    args = c["args"]
    assert args[0] == "canary"
    assert args[args.index("--pushgateway") + 1] == "$(PROBE_PUSHGATEWAY)"
    assert args[args.index("--sink-url") + 1] == "ws://$(POD_IP):8766/sink"
    env = _env(c)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert [r["configMapRef"]["name"] for r in c["envFrom"]] == ["probe-config"]
    cfg = _config()
    assert cfg["PROBE_PUSHGATEWAY"].startswith("http://")
    assert cfg["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")
    assert cfg["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    scenario = args[args.index("--scenario") + 1]
    mount = next(m for m in c["volumeMounts"] if scenario.startswith(m["mountPath"] + "/"))
    volume = next(v for v in _pod_spec(cron)["volumes"] if v["name"] == mount["name"])
    scenarios = _find("ConfigMap", volume["configMap"]["name"])["data"]
    assert Path(scenario).name in scenarios
    # The sink listens on the port the URL names.
    parsed = tomllib.loads(scenarios[Path(scenario).name])
    assert parsed["sink_listen"] == "0.0.0.0:8766"
    assert {p["containerPort"] for p in c["ports"]} == {8766}


def test_the_scenario_in_the_configmap_loads_as_a_canary_scenario(tmp_path: Path) -> None:
    from probe.canary.scenario import load_scenario

    for name, text in _find("ConfigMap", "probe-scenarios")["data"].items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        scenario = load_scenario(path)
        assert scenario.thresholds, name


def test_worker_sinks_are_reachable_at_the_pod_ip() -> None:
    worker = _find("Deployment", "probe-locust-worker")
    c = _container(worker)
    env_list = [e["name"] for e in c["env"]]
    env = _env(c)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # $(VAR) in a value expands only variables defined before it.
    for name in ("PROBE_SINK_URL", "PROBE_SINK_HOST"):
        assert "$(POD_IP)" in env[name]
        assert env_list.index("POD_IP") < env_list.index(name)
    assert env["PROBE_SINK_URL"] == "ws://$(POD_IP):8766/sink"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["sink"] == int(env["PROBE_SINK_LISTEN"].rpartition(":")[2]) == 8766
    assert ports["metrics"] == int(env["PROBE_METRICS_LISTEN"].rpartition(":")[2]) == 9646
    args = c["args"]
    assert "--worker" in args
    assert args[args.index("--master-host") + 1] == "probe-locust-master"


def test_services_select_their_pods_and_name_real_container_ports() -> None:
    docs = _docs()
    workloads = [d for _, d in docs if d["kind"] == "Deployment"]
    services = [d for _, d in docs if d["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {
        "probe-locust-master",
        "probe-locust-worker",
        "probe-exporter",
        "probe-pipeline",
    }
    for svc in services:
        selector = svc["spec"]["selector"]
        matches = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, svc["metadata"]["name"]
        names = {p["name"] for p in _container(matches[0])["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port)
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= (
            w["spec"]["template"]["metadata"]["labels"].items()
        )
    master = _find("Service", "probe-locust-master")
    assert {p["port"] for p in master["spec"]["ports"]} == {8089, 5557}
    assert _find("Service", "probe-locust-worker")["spec"]["clusterIP"] == "None"


def test_every_workload_runs_the_probe_image_as_non_root() -> None:
    for name, doc in _docs():
        if doc["kind"] not in ("Deployment", "CronJob"):
            continue
        pod = _pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        c = _container(doc)
        assert re.fullmatch(r"probe:\d+\.\d+\.\d+", c["image"]), (name, c["image"])
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_exporter_tells_the_hops_its_pod_ip_and_runs_one_probe_at_a_time() -> None:
    c = _container(_find("Deployment", "probe-exporter"))
    env = _env(c)
    assert env["PROBE_SINK_URL"] == "ws://$(POD_IP):8766/sink"
    args = c["args"]
    assert args[0] == "exporter"
    assert args[args.index("--max-probes") + 1] == "1"
    assert args[args.index("--listen") + 1] == "0.0.0.0:9116"


def test_locust_pods_run_a_locustfile_that_exists() -> None:
    for name in ("probe-locust-master", "probe-locust-worker"):
        args = _container(_find("Deployment", name))["args"]
        locustfile = args[args.index("--locustfile") + 1]
        assert (ROOT / locustfile).is_file(), f"{name}: {locustfile} (issue 5) is missing"


def test_scrape_config_example_passes_promtool(tmp_path: Path) -> None:
    exe = shutil.which("promtool")
    if exe is None:
        if _CI:
            pytest.fail("promtool is not installed (CI installs it in .ci/run)")
        pytest.skip("promtool not installed")
    text = _find("ConfigMap", "probe-prometheus-example")["data"]["prometheus.yml"]
    path = tmp_path / "prometheus.yml"
    path.write_text(text, encoding="utf-8")
    out = subprocess.run(
        [exe, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {j["job_name"]: j for j in yaml.safe_load(text)["scrape_configs"]}
    probe = jobs["probe"]
    assert probe["metrics_path"] == "/probe"
    (address,) = [
        r["replacement"] for r in probe["relabel_configs"] if r.get("target_label") == "__address__"
    ]
    assert address.startswith("probe-exporter.") and address.endswith(":9116")
    (sd,) = jobs["probe-locust-workers"]["dns_sd_configs"]
    assert sd["names"][0].startswith("probe-locust-worker.") and sd["port"] == 9646
