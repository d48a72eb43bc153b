"""deploy/: every name the Kubernetes manifests and Prometheus files use exists in the code.

The manifests are parsed; each container command goes through the real CLI parser; each
HETBATCH_* variable must be a setting the code reads; ports agree between the env, the
container and the scrape annotations; each KEDA query's metric is one the code exports
and its queue pattern selects exactly its pool's queues; the alert rules name exported
metrics and the scrape job the example configs define.
"""

from __future__ import annotations

import functools
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from hetbatch.producers.protocol.keys import Keys
from hetbatch.producers.protocol.wire import DEVICES, FRAMEWORKS, FUSION_QUEUE, queue_for
from hetbatch.producers.settings import ClientSettings
from hetbatch.worker.cli import build_parser
from hetbatch.worker.devtools.redis_server import free_port
from hetbatch.worker.metrics import WorkerMetrics
from hetbatch.worker.ops.backlog import metric_families
from hetbatch.worker.settings import WorkerSettings
from tests.kit.helpers import ROOT

DEPLOY = ROOT / "deploy"
SETTINGS = {f.name for f in fields(WorkerSettings)} | {f.name for f in fields(ClientSettings)}
ALL_QUEUES = [queue_for(f, d) for d in DEVICES for f in FRAMEWORKS] + [FUSION_QUEUE]


def documents() -> list[dict[str, Any]]:
    out = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


DOCS = documents()
DEPLOYMENTS = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "Deployment"}
SCALED = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "ScaledObject"}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_of(deployment: dict[str, Any]) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container(deployment).get("env", [])}


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@functools.cache
def exported_metrics() -> set[str]:
    """Sample names the worker's endpoint and the backlog exporter can produce, read off
    the real collectors (Redis unreachable: the families are still declared)."""
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    settings = WorkerSettings(metrics_port=free_port(), shm_dir="")
    metrics = WorkerMetrics(settings, dead, list)
    families = [*metrics.registry.collect(), *metric_families(dead, Keys(), ["onnx.cpu"])]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def test_deploy_ships_worker_pools_an_exporter_and_their_scaled_objects() -> None:
    assert set(DEPLOYMENTS) == {"hetbatch-worker-cpu", "hetbatch-worker-gpu", "hetbatch-backlog-exporter"}
    assert set(SCALED) == {"hetbatch-worker-cpu", "hetbatch-worker-gpu"}
    for name, scaled in SCALED.items():
        assert scaled["spec"]["scaleTargetRef"]["name"] == name in DEPLOYMENTS
    gpu = container(DEPLOYMENTS["hetbatch-worker-gpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert SCALED["hetbatch-worker-gpu"]["spec"]["minReplicaCount"] == 0  # scale to zero: the exporter wakes it


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_every_container_command_is_accepted_by_the_real_cli(name: str) -> None:
    argv = [str(a) for a in container(DEPLOYMENTS[name])["command"]]
    assert argv[0] == "hetbatch"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{name}: 'hetbatch {' '.join(argv[1:])}' is refused by the CLI ({exc})")
    if name.startswith("hetbatch-worker-"):
        assert args.command == "worker" and args.pool == name.rsplit("-", 1)[1]
    else:
        assert args.command == "backlog" and args.serve_port is not None


@pytest.mark.parametrize("name", [n for n in sorted(DEPLOYMENTS) if n.startswith("hetbatch-worker-")])
def test_the_grace_period_outlasts_the_longest_batch(name: str) -> None:
    # Past the grace period Kubernetes SIGKILLs the pod: a batch still running then is
    # cut, and its jobs wait for the visibility timeout after all.
    deployment = DEPLOYMENTS[name]
    grace = int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    longest = float(env_of(deployment).get("HETBATCH_TASK_TIMEOUT_S") or WorkerSettings().task_timeout_s)
    assert grace > longest


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_every_variable_is_a_setting_the_code_reads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(DEPLOYMENTS[name])
    assert "HETBATCH_REDIS_URL" in env  # from the Secret
    for var, value in env.items():
        assert var == "PYTHONUNBUFFERED" or (var.startswith("HETBATCH_") and var[9:].lower() in SETTINGS), var
        if value is not None:
            monkeypatch.setenv(var, value)
    parsed = WorkerSettings.from_env()
    for var, value in env.items():
        if var.startswith("HETBATCH_") and value is not None:
            assert str(getattr(parsed, var[9:].lower())) == value, var


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_the_metrics_port_agrees_with_the_container_and_the_scrape_annotations(name: str) -> None:
    deployment = DEPLOYMENTS[name]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    argv = [str(a) for a in container(deployment)["command"]]
    served = env_of(deployment).get("HETBATCH_METRICS_PORT") if "worker" in argv else option(argv, "--serve-port")
    assert int(str(served)) == ports["metrics"] == int(notes["prometheus.io/port"])
    assert notes["prometheus.io/scrape"] == "true"
    probe = container(deployment)["readinessProbe"]["httpGet"]
    assert probe == {"path": notes.get("prometheus.io/path", "/metrics"), "port": "metrics"}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_each_scaler_queries_an_exported_metric_over_exactly_its_pools_queues(name: str) -> None:
    (trigger,) = SCALED[name]["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert set(re.findall(r"\b(hetbatch_\w+)", query)) <= exported_metrics()
    assert "max by (queue, state)" in query  # every exporter reports the same Redis-wide value
    (pattern,) = re.findall(r'queue=~"([^"]+)"', query)
    pool = name.rsplit("-", 1)[1]
    selected = {q for q in ALL_QUEUES if re.fullmatch(pattern, q)}  # PromQL regexes are anchored
    # (A gpu worker lists only the frameworks that import where it runs: the layout's queues here.)
    queues = WorkerSettings(shm_dir="").queue_names if pool == "cpu" else [queue_for(f, "gpu") for f in FRAMEWORKS]
    assert selected == set(queues)
    # Jobs per replica: what one worker holds (threads x prefetch multiplier).
    deployment = DEPLOYMENTS[name]
    argv = [str(a) for a in container(deployment)["command"]]
    multiplier = int(env_of(deployment).get("HETBATCH_PREFETCH_MULTIPLIER") or WorkerSettings().prefetch_multiplier)
    assert int(trigger["metadata"]["threshold"]) == int(option(argv, "--concurrency")) * multiplier


def test_the_alert_rules_name_exported_metrics_and_the_scrape_job_of_the_configs() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    bare = [re.sub("|".join(map(re.escape, recorded)), "", e) for e in exprs]  # recorded series are not exported
    named = {m for e in bare for m in re.findall(r"\b(hetbatch_[a-z_]+)\b", e)}
    assert named and named <= exported_metrics(), named - exported_metrics()
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {"HetbatchBacklogGrowing", "HetbatchDeadLetters", "HetbatchWorkerDown", "HetbatchErrorRate"}
    jobs = set(re.findall(r'job="([^"]+)"', " ".join(exprs)))
    for config in ("prometheus.yml", "kubernetes-scrape.yml"):
        scrape = yaml.safe_load((DEPLOY / "prometheus" / config).read_text())["scrape_configs"]
        assert jobs <= {s["job_name"] for s in scrape}, config
    doc = (ROOT / "docs" / "scaling.md").read_text()
    assert all(alert in doc for alert in alerts)


def test_the_kubernetes_scrape_config_selects_the_pods_of_the_manifests() -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes-scrape.yml").read_text())["scrape_configs"]
    keep = {s["job_name"]: s["relabel_configs"][0]["regex"] for s in scrape}
    components = {n: d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for n, d in DEPLOYMENTS.items()}  # fmt: skip
    assert {c for c in components.values() if re.fullmatch(keep["hetbatch-workers"], c)} == {"worker-cpu", "worker-gpu"}
    assert {c for c in components.values() if re.fullmatch(keep["hetbatch-backlog"], c)} == {"backlog-exporter"}


def test_docs_link_the_deploy_folder() -> None:
    assert "scaling.md" in (ROOT / "docs" / "operations.md").read_text()
    assert Path(DEPLOY / "kubernetes").is_dir()
