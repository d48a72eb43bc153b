"""Security: no pickle on the wire, Redis password/ACL/TLS from the URL, artifacts checked.

The Redis here requires a password for the default user and has an ACL user,
``hetbatch``, allowed only the commands the project needs (``ACL_COMMANDS``, also
listed in SECURITY.md). Worker, client, reconciler and dead-letter commands all run
as that user.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from hetbatch.adapters import sha256_of
from hetbatch.producers import BrokerError, Client, JobFailed
from hetbatch.producers.protocol.registry import ModelSpec
from hetbatch.producers.protocol.schema import TensorSpec
from hetbatch.producers.protocol.wire import CELERY_WIRE_CONFIG, TASK_NAME
from hetbatch.worker.devtools.redis_server import RedisServer, find_redis_server, free_port
from hetbatch.worker.modelops.config import write_config
from tests.kit.helpers import ROOT, WorkerProcess, column, register
from tests.kit.models import Built, sklearn_model

ADMIN_PASSWORD = "admin-s3cret"
USER, USER_PASSWORD = "hetbatch", "hb-s3cret"
# Every command producers, workers (Celery/kombu included), the reconciler and the
# dead-letter list send; found with INFO commandstats over the whole test flow.
ACL_COMMANDS = (
    "auth", "hello", "ping", "select", "echo", "quit", "reset", "client|setname", "client|id", "time",
    "get", "set", "del", "exists", "expire", "pexpire", "mget", "incr", "incrby", "rename",
    "hget", "hset", "hsetnx", "hdel", "hgetall", "hkeys", "hvals", "hmget", "hincrby", "hincrbyfloat",
    "lpush", "rpush", "lpop", "blpop", "brpop", "blmpop", "llen", "lrange", "lrem", "sadd", "srem", "smembers",
    "zadd", "zrem", "zrange", "zrangebyscore", "multi", "exec", "discard", "watch", "unwatch",
    "eval", "evalsha", "script|load", "script|exists",
    "publish", "subscribe", "psubscribe", "unsubscribe", "punsubscribe",
)  # fmt: skip
FAST = {"HETBATCH_VISIBILITY_TIMEOUT_S": "8", "HETBATCH_LEASE_INTERVAL_S": "1", "HETBATCH_RECONCILE_INTERVAL_S": "1"}


def acl_rule() -> list[str]:
    return [USER, "on", f">{USER_PASSWORD}", "~*", "&*", "-@all", *(f"+{c}" for c in ACL_COMMANDS)]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, str, WorkerProcess, Path]]:
    """A password-protected Redis with an ACL user, and a worker logged in as that user."""
    work = tmp_path_factory.mktemp("security")
    server = RedisServer("--requirepass", ADMIN_PASSWORD, "--user", *acl_rule())
    url = f"redis://{USER}:{USER_PASSWORD}@127.0.0.1:{server.port}/0"
    worker = WorkerProcess(url, work, env=FAST)
    yield server, url, worker, work
    worker.stop()
    server.stop()


def test_a_wrong_or_missing_password_cannot_connect(secured: tuple[RedisServer, str, WorkerProcess, Path]) -> None:
    server, _url, _worker, _work = secured
    for bad in (
        f"redis://{USER}:wrong@127.0.0.1:{server.port}/0",
        f"redis://:wrong@127.0.0.1:{server.port}/0",
        f"redis://127.0.0.1:{server.port}/0",
    ):
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            redis.Redis.from_url(bad).get("hb:models")
        with Client.from_url(bad) as client, pytest.raises((BrokerError, redis.RedisError)):
            client.submit("anything", np.zeros((1, 4)))


def test_the_acl_user_runs_jobs_but_nothing_else(secured: tuple[RedisServer, str, WorkerProcess, Path]) -> None:
    server, url, _worker, work = secured
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
    admin.acl_log_reset()
    built = sklearn_model(work / "acl-iris", "acl-iris", "iris")
    with Client.from_url(url) as client:
        register(client, built.directory)
        np.testing.assert_array_equal(
            column(client.predict("acl-iris", built.X, timeout_s=120), "label"), built.model.predict(built.X)
        )
        jobs = client.submit_many("acl-iris", [built.X[:3], built.X[3:10]])
        for job, x in zip(jobs, [built.X[:3], built.X[3:10]], strict=True):
            np.testing.assert_array_equal(column(job.result(timeout_s=120), "label"), built.model.predict(x))
        assert len(jobs[0].attempts()) == 1
        with Client.from_url(url, lane_max_rows=16) as lane:  # the lane's commands are allowed too
            out = lane.predict("acl-iris", built.X[:4], timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:4]))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for args in (["reconcile", "--once", "--overdue-s", "0"], ["dlq", "list"], ["dlq", "purge"]):
            done = subprocess.run(
                [sys.executable, "-m", "hetbatch", "--redis-url", url, *args],
                capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        denied = [e for e in admin.acl_log() if e.get("username") == USER]
        assert not denied, denied  # the whole flow needed no command outside ACL_COMMANDS
        for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCRIPT", "FLUSH"), ("SHUTDOWN",)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.redis.execute_command(*command)


class _Evil:
    """What an attacker would put in a pickled task: code run on unpickling."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_task_message_is_refused_and_the_worker_stays_up(
    secured: tuple[RedisServer, str, WorkerProcess, Path],
) -> None:
    _server, url, worker, work = secured
    marker = work / "pwned"
    attacker = Celery("attacker", broker=url, set_as_current=False)
    attacker.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    for queue in ("sklearn.cpu", "onnx.cpu"):
        attacker.send_task(TASK_NAME, args=[_Evil(marker)], queue=queue, serializer="pickle")
    attacker.close()
    deadline = time.monotonic() + 60
    while worker.output().count("application/x-python-serialize") < 2:
        assert time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(0.2)
    # Refused before Celery sees it (the frame guard moves it aside) or by Celery itself.
    out = worker.output()
    assert "application/x-python-serialize', not application/json" in out or "ContentDisallowed" in out
    assert not marker.exists()
    assert worker.alive()
    built = sklearn_model(work / "after-pickle", "after-pickle", "iris")
    with Client.from_url(url) as client:
        register(client, built.directory)
        out = client.predict("after-pickle", built.X[:20], timeout_s=120)
        np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:20]))


def test_nothing_unpickles_wire_data() -> None:
    assert CELERY_WIRE_CONFIG["accept_content"] == ["json"]
    assert CELERY_WIRE_CONFIG["task_serializer"] == "json"
    from hetbatch.worker.app import make_app
    from hetbatch.worker.settings import WorkerSettings

    assert make_app(WorkerSettings()).conf.accept_content == ["json"]
    forbidden = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    for package in ("producers", "worker"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module.split(".")[0]]
                assert not forbidden & set(names), f"{path.name} imports {names}"
                if isinstance(node, ast.Attribute):
                    assert node.attr not in ("read_pickle", "deserialize_pandas"), path.name
    # The only unpickling loader in the adapters sits behind the pinned-hash check.
    for path in (ROOT / "adapters").rglob("*.py"):
        text = path.read_text()
        if "joblib.load" in text or "pickle.load" in text:
            assert "pickle_suffixes" in text and path.name != "base.py", path.name


def test_a_tampered_artifact_is_refused_at_load(secured: tuple[RedisServer, str, WorkerProcess, Path]) -> None:
    _server, url, _worker, work = secured
    built = sklearn_model(work / "tamper", "tamper-iris", "iris")
    with Client.from_url(url) as client:
        register(client, built.directory)
        artifact = built.directory / "model.skops"
        original = artifact.read_bytes()
        artifact.write_bytes(original + b"\0")
        with pytest.raises(JobFailed) as info:
            client.predict("tamper-iris", built.X[:5], timeout_s=120)
        assert info.value.remote_type == "ModelLoadError" and "sha256" in info.value.remote_message
        artifact.write_bytes(original)  # load errors are not cached: the fixed file is picked up
        out = client.predict("tamper-iris", built.X[:5], timeout_s=120)
        np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:5]))


def _evil_joblib(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps(_Evil(marker)))


def test_pickle_artifacts_are_refused_unless_pinned(secured: tuple[RedisServer, str, WorkerProcess, Path]) -> None:
    import joblib

    from hetbatch.adapters import UnsafeArtifact
    from hetbatch.worker.modelops.registration import build_spec

    _server, url, _worker, work = secured
    marker = work / "pwned-artifact"
    evil_dir = work / "evil"
    evil_dir.mkdir()
    _evil_joblib(evil_dir / "model.joblib", marker)
    write_config(evil_dir, name="evil", framework="sklearn", artifact="model.joblib")
    with pytest.raises(UnsafeArtifact, match="pin its sha256"):
        build_spec(evil_dir)
    spec = ModelSpec(
        name="evil",
        framework="sklearn",
        artifact=str(evil_dir / "model.joblib"),
        sha256=sha256_of(evil_dir / "model.joblib"),
        inputs=(TensorSpec("X", "float64", (4,)),),
        outputs=("label",),
        pinned=False,
    )
    with Client.from_url(url) as client:
        client.registry.register(spec)  # as a registry writer could, bypassing build_spec
        with pytest.raises(JobFailed) as info:
            client.predict("evil", np.ones((2, 4)), timeout_s=120)
        assert info.value.remote_type == "UnsafeArtifact"
        assert not marker.exists()
        built: Built = sklearn_model(work / "plain", "plain", "iris")
        trusted = work / "trusted"
        trusted.mkdir()
        joblib.dump(built.model, trusted / "model.joblib")
        write_config(
            trusted, name="trusted-joblib", framework="sklearn", artifact="model.joblib",
            sha256=sha256_of(trusted / "model.joblib"),
        )  # fmt: skip
        register(client, trusted)
        out = client.predict("trusted-joblib", built.X[:9], timeout_s=120)
        np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X[:9]))


# -- TLS ---------------------------------------------------------------------------------


def _make_certs(directory: Path) -> bool:
    if shutil.which("openssl") is None:
        return False

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=hetbatch-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return True


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[tuple[str, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="hetbatch-tls-"))
    if not _make_certs(directory):
        pytest.skip("openssl is not installed: TLS is documented in SECURITY.md, not tested here")
    port = free_port()
    proc = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--requirepass", ADMIN_PASSWORD,
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt",
         "--tls-auth-clients", "no"],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.skip("this redis-server was built without TLS support")
            assert time.monotonic() < deadline
            time.sleep(0.05)
    url = f"rediss://:{ADMIN_PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={directory / 'ca.crt'}"
    yield url, directory
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(directory, ignore_errors=True)


def test_tls_from_a_rediss_url(tls_redis: tuple[str, Path], tmp_path: Path) -> None:
    url, _directory = tls_redis
    plain = url.replace("rediss://", "redis://").split("?")[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2).ping()
    unverified = url.split("&ssl_ca_certs")[0]
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(unverified).ping()
    built = sklearn_model(tmp_path / "tls-iris", "tls-iris", "iris")
    worker = WorkerProcess(url, tmp_path, env=FAST)
    try:
        with Client.from_url(url) as client:
            register(client, built.directory)
            out = client.predict("tls-iris", built.X, timeout_s=120)
            np.testing.assert_array_equal(column(out, "label"), built.model.predict(built.X))
    finally:
        worker.stop()
