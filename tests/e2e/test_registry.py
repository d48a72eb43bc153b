"""The model registry on a real private Redis: versions, resolution, immutability, deletion."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis

from hetbatch.producers import ConfigError, ModelNotFound, ModelSpec, Registry
from hetbatch.producers.protocol.keys import Keys
from hetbatch.worker.modelops.registration import build_spec
from tests.kit.models import sklearn_model


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    built = sklearn_model(tmp_path_factory.mktemp("registry") / "reg-iris", "reg-iris", kind="logreg")
    return build_spec(built.directory)


@pytest.fixture()
def keys(request: pytest.FixtureRequest) -> Keys:
    # A prefix per test: the module's Redis is shared and each test starts from an empty registry.
    return Keys(f"reg-{request.node.name}")


@pytest.fixture()
def registry(private_redis: str, keys: Keys) -> Registry:
    return Registry(redis.Redis.from_url(private_redis), keys)


def test_versions_are_assigned_in_order_and_the_name_resolves_to_the_latest(
    registry: Registry, spec: ModelSpec
) -> None:
    first = registry.register(spec)
    second = registry.register(replace(spec, max_batch_rows=512))
    assert (first.version, second.version) == ("1", "2")
    assert registry.get("reg-iris") == second
    assert registry.get("reg-iris@1") == first
    assert registry.versions("reg-iris") == ["1", "2"]
    assert registry.names() == ["reg-iris"] and registry.list() == [second]
    assert second.ref == "reg-iris@2"


def test_a_version_never_changes(registry: Registry, spec: ModelSpec) -> None:
    pinned = replace(spec, version="7")
    assert registry.register(pinned).version == "7"
    assert registry.register(pinned) == registry.get("reg-iris@7")  # the same contents again: a no-op
    with pytest.raises(ConfigError, match="immutable"):
        registry.register(replace(pinned, sha256="0" * 64))


def test_unknown_names_and_versions_raise_model_not_found(registry: Registry, spec: ModelSpec) -> None:
    registry.register(spec)
    with pytest.raises(ModelNotFound):
        registry.get("no-such-model")
    with pytest.raises(ModelNotFound):
        registry.get("reg-iris@99")


def test_delete_forgets_every_version_and_the_counter(registry: Registry, spec: ModelSpec) -> None:
    registry.register(spec)
    registry.register(spec)
    registry.delete("reg-iris")
    assert registry.names() == [] and registry.versions("reg-iris") == []
    assert registry.register(spec).version == "1"  # numbering starts again


def test_the_entry_round_trips_through_redis_unchanged(
    registry: Registry, spec: ModelSpec, private_redis: str, keys: Keys
) -> None:
    stored = registry.register(spec)
    fresh = Registry(redis.Redis.from_url(private_redis), keys).get(stored.ref)  # another process's view
    assert fresh == stored and isinstance(fresh, ModelSpec)
    assert fresh.inputs == spec.inputs and fresh.outputs == spec.outputs and fresh.artifact == spec.artifact
