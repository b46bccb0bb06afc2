"""The compose stack hangs together: docker-compose accepts the file, Prometheus accepts its
configuration, and every host:port a component is pointed at is a compose service listening on
that port (Prometheus targets, Grafana data sources, the collector's exporter, URLs in the
services' environment and commands, the stack's scenario)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
COLLECTOR = ROOT / "deploy/otel-collector/config.yaml"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml"
DASHBOARD_PROVIDERS = ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yaml"
SCENARIO = ROOT / "deploy/scenarios/reference.toml"
TIMEOUT_S = 60.0 * float(os.environ.get("PROBE_TEST_TIMEOUT_FACTOR", "1"))

_CI = os.environ.get("CI") == "true"

# Ports the third-party images listen on (their documented defaults; the collector's come from
# its own configuration below).
IMAGE_PORTS = {
    "jaeger": {4317, 4318, 16686},
    "prometheus": {9090},
    "pushgateway": {9091},
    "grafana": {3000},
}
LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0"}
_URL = re.compile(r"\b(?:wss?|https?|grpc)://([A-Za-z0-9][A-Za-z0-9_.-]*)(?::(\d+))?")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if _CI:
            pytest.fail(f"{binary} is not installed (CI installs it in .ci/run)")
        pytest.skip(f"{binary} not installed")
    return path


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _compose() -> dict[str, Any]:
    """The file as docker-compose v1 resolves it (interpolation, merge keys) when installed,
    else as YAML: the cross-reference tests below must run either way."""
    exe = shutil.which("docker-compose")
    if exe is None:
        return dict(_yaml(COMPOSE))
    out = subprocess.run(
        [exe, "-f", str(COMPOSE), "config"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "probe-stack-test"},
    )
    assert out.returncode == 0, out.stderr
    return dict(yaml.safe_load(out.stdout))


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _listen_port(text: str) -> int:
    return int(text.rpartition(":")[2])


def _listening(compose: dict[str, Any]) -> dict[str, set[int]]:
    """Service name -> the ports it listens on inside the compose network."""
    collector = _yaml(COLLECTOR)
    protocols = collector["receivers"]["otlp"]["protocols"]
    ports: dict[str, set[int]] = {name: set(p) for name, p in IMAGE_PORTS.items()}
    ports["otel-collector"] = {_listen_port(p["endpoint"]) for p in protocols.values()}
    for name, svc in compose["services"].items():
        if "build" not in svc and svc.get("image", "").split(":")[0] != "probe":
            continue
        found: set[int] = set()
        words = " ".join(_strings(svc.get("command", [])) + _strings(svc.get("entrypoint", [])))
        for m in re.finditer(r"--(?:listen|sink-listen|metrics-listen)[ =](\S+)", words):
            found.add(_listen_port(m.group(1)))
        env = svc.get("environment", {})
        for key in ("PROBE_SINK_LISTEN", "PROBE_METRICS_LISTEN"):
            if key in env:
                found.add(_listen_port(env[key]))
        if "--master" in words.split():
            found |= {8089, 5557}  # Locust's web UI and worker ports
        if "--scenario" in words or "--scenarios" in words:
            scenario = tomllib.loads(SCENARIO.read_text(encoding="utf-8"))
            found.add(_listen_port(scenario["sink_listen"]))
        ports[name] = found
    return ports


def _references(compose: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """(where, host, port) for every address a component is told to reach."""
    refs: list[tuple[str, str, int | None]] = []

    def add(where: str, hostport: str) -> None:
        if "://" in hostport:
            u = urlsplit(hostport)
            refs.append((where, u.hostname or "", u.port))
        else:
            host, _, port = hostport.rpartition(":")
            refs.append((where, host, int(port)))

    prom = _yaml(PROMETHEUS)
    for job in prom["scrape_configs"]:
        where = f"prometheus job {job['job_name']}"
        replaced = [
            r["replacement"]
            for r in job.get("relabel_configs", [])
            if r.get("target_label") == "__address__"
        ]
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                add(where + " target", t)
        for r in replaced:
            add(where + " relabelled address", r)
        for sd in job.get("dns_sd_configs", []):
            for n in sd["names"]:
                refs.append((where + " dns_sd", n, int(sd["port"])))
    for ds in _yaml(DATASOURCES)["datasources"]:
        add(f"grafana data source {ds['name']}", ds["url"])
    for name, exp in _yaml(COLLECTOR)["exporters"].items():
        if "endpoint" in exp:
            add(f"collector exporter {name}", exp["endpoint"])
    for name, svc in compose["services"].items():
        for s in _strings(svc):
            for m in _URL.finditer(s):
                refs.append((f"service {name}", m.group(1), int(m.group(2) or 0) or None))
        words = _strings(svc.get("command", []))
        joined = " ".join(words)
        for m in re.finditer(r"--master-host[ =](\S+)", joined):
            refs.append((f"service {name} --master-host", m.group(1), 5557))
    scenario = tomllib.loads(SCENARIO.read_text(encoding="utf-8"))
    add("deploy/scenarios/reference.toml target", scenario["target"])
    return refs


def test_docker_compose_v1_accepts_the_file() -> None:
    exe = _need("docker-compose")
    out = subprocess.run(
        [exe, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "probe-stack-test"},
    )
    assert out.returncode == 0, out.stderr
    assert "ERROR" not in out.stderr, out.stderr


def test_compose_file_avoids_keys_only_one_compose_generation_knows() -> None:
    raw = _yaml(COMPOSE)
    # `version` is obsolete for v2 (warns) and v1.29 does not need it; `deploy`, `profiles`,
    # `develop` and long-form depends_on conditions are not the same across the two.
    assert "version" not in raw
    for name, svc in raw["services"].items():
        for key in ("deploy", "profiles", "develop", "container_name"):
            assert key not in svc, f"{name} uses {key}"
        if isinstance(svc.get("depends_on"), dict):
            pytest.fail(f"{name}: use the short depends_on list")


def test_stack_has_the_components_the_issue_lists() -> None:
    services = _compose()["services"]
    commands = {n: " ".join(_strings(s.get("command", []))) for n, s in services.items()}
    assert "pipeline" in commands["pipeline"].split()
    assert "--master" in commands["locust-master"]
    assert "--worker" in commands["locust-worker"]
    assert commands["probe-exporter"].startswith("exporter")
    assert "probe canary" in commands["canary"] and "--pushgateway" in commands["canary"]
    images = {n: s.get("image", "") for n, s in services.items()}
    for name, image in (
        ("otel-collector", "otel/opentelemetry-collector"),
        ("jaeger", "jaegertracing/all-in-one"),
        ("prometheus", "prom/prometheus"),
        ("pushgateway", "prom/pushgateway"),
        ("grafana", "grafana/grafana"),
    ):
        assert images[name].startswith(image + ":"), (name, images[name])
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    # Scalable: a worker publishes no host port and has no fixed container name.
    assert "ports" not in services["locust-worker"]


def test_every_third_party_image_is_pinned_to_a_version_and_probe_images_are_built() -> None:
    for name, svc in _compose()["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            assert image == "probe:local", name
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned"


def test_published_ports_do_not_collide_and_bind_mounts_exist() -> None:
    raw = _yaml(COMPOSE)
    published: list[str] = []
    for name, svc in raw["services"].items():
        published += [str(p).split(":")[0] for p in svc.get("ports", [])]
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"
    assert len(published) == len(set(published)), published


def test_every_address_in_the_stack_is_a_service_listening_on_that_port() -> None:
    compose = _compose()
    listening = _listening(compose)
    refs = _references(compose)
    assert len(refs) >= 10, refs  # the walk itself found the configuration's addresses
    problems = []
    for where, host, port in refs:
        if host in LOCAL_HOSTS:
            continue
        if host not in listening:
            problems.append(f"{where} points at {host!r}, which is not a compose service")
        elif port is not None and port not in listening[host]:
            problems.append(
                f"{where} points at {host}:{port}; {host} listens on {sorted(listening[host])}"
            )
    assert not problems, "\n".join(problems)


def test_the_address_check_catches_a_wrong_host_and_a_wrong_port() -> None:
    compose = _compose()
    listening = _listening(compose)
    assert "pipeline" in listening and {8765, 9101} <= listening["pipeline"]
    assert 9646 in listening["locust-worker"] and 8766 in listening["locust-worker"]
    assert 9116 in listening["probe-exporter"] and 8766 in listening["probe-exporter"]
    assert "pipelines" not in listening and 9647 not in listening["probe-exporter"]


def test_the_canary_and_exporter_tell_the_hops_their_own_sink() -> None:
    services = _compose()["services"]
    canary = " ".join(_strings(services["canary"]["command"]))
    assert "--sink-url ws://canary:8766/sink" in canary
    exporter_env = services["probe-exporter"]["environment"]
    assert exporter_env["PROBE_SINK_URL"] == "ws://probe-exporter:8766/sink"
    assert "--max-probes 1" in " ".join(_strings(services["probe-exporter"]["command"]))
    worker = " ".join(_strings(services["locust-worker"]["command"]))
    # The worker advertises its own container address, so scaled replicas each get their own.
    # (`docker-compose config` prints `$` escaped as `$$`, the file's own spelling.)
    worker = worker.replace("$$", "$")
    assert 'PROBE_SINK_HOST="${PROBE_SINK_HOST:-$(hostname -i' in worker
    assert 'PROBE_SINK_URL="${PROBE_SINK_URL:-ws://${PROBE_SINK_HOST}:8766/sink}"' in worker
    assert worker.rstrip().split()[-2:] == ["--locustfile", '"${PROBE_LOCUSTFILE}"']


def test_locustfile_the_stack_runs_exists() -> None:
    services = _compose()["services"]
    master = _strings(services["locust-master"]["command"])
    locustfile = master[master.index("--locustfile") + 1]
    assert (ROOT / locustfile).is_file(), f"{locustfile} (issue 5) is not in the repository"
    assert services["locust-worker"]["environment"]["PROBE_LOCUSTFILE"] == locustfile


def test_prometheus_configuration_passes_promtool() -> None:
    exe = _need("promtool")
    out = subprocess.run(
        [exe, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rejects_a_broken_configuration(tmp_path: Path) -> None:
    exe = _need("promtool")
    broken = PROMETHEUS.read_text(encoding="utf-8").replace("dns_sd_configs", "dns_sd_confs", 1)
    bad = tmp_path / "prometheus.yml"
    bad.write_text(broken, encoding="utf-8")
    out = subprocess.run(
        [exe, "check", "config", str(bad)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert out.returncode != 0


def test_collector_receives_otlp_and_exports_to_jaeger_over_otlp() -> None:
    cfg = _yaml(COLLECTOR)
    protocols = cfg["receivers"]["otlp"]["protocols"]
    assert set(protocols) == {"grpc", "http"}
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    pipelines = cfg["service"]["pipelines"]
    traces = pipelines["traces"]
    assert traces["receivers"] == ["otlp"]
    (exporter,) = traces["exporters"]
    assert exporter.split("/")[0] == "otlp"
    exp = cfg["exporters"][exporter]
    assert exp["endpoint"] == "jaeger:4317" and exp["tls"]["insecure"] is True
    # Every component a pipeline names is defined, and is one the core distribution ships.
    core = {"otlp", "batch", "memory_limiter", "debug", "otlphttp"}
    for pipe in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipe.get(kind, []):
                assert comp in cfg[kind], f"{comp} is not defined under {kind}"
                assert comp.split("/")[0] in core, comp


def test_grafana_provisioning_links_exemplars_to_jaeger_and_loads_the_dashboard() -> None:
    sources = {d["uid"]: d for d in _yaml(DATASOURCES)["datasources"]}
    prom = next(d for d in sources.values() if d["type"] == "prometheus")
    (dest,) = prom["jsonData"]["exemplarTraceIdDestinations"]
    assert dest["name"] == "trace_id"
    assert sources[dest["datasourceUid"]]["type"] == "jaeger"
    (provider,) = _yaml(DASHBOARD_PROVIDERS)["providers"]
    grafana = _yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/probe.json"
    assert (ROOT / "deploy/grafana/dashboards/probe.json").is_file()
