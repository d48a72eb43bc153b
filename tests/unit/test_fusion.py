"""Fusion strategies alone: pure functions over numpy, no broker, checked against
plain-Python reference computations."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetbatch.producers.errors import ConfigError, PayloadError
from hetbatch.producers.protocol.ensemble import Continuation, EnsembleSpec, Member, route_rows
from hetbatch.producers.protocol.schema import TensorSpec, arrays_to_table
from hetbatch.producers.protocol.wire import TaskEnvelope
from hetbatch.worker.ensemble import result_arrays
from hetbatch.worker.fusion import MemberOutput, align, fuse, strategy


def member(name: str, values: np.ndarray, use: str = "out", weight: float = 1.0, **kw: object) -> MemberOutput:
    return MemberOutput(name, {use: values}, use, weight, **kw)  # type: ignore[arg-type]


def probs(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    raw = rng.random((rows, classes))
    return raw / raw.sum(axis=1, keepdims=True)


def test_mean_and_weighted_mean_match_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b, c32 = rng.standard_normal((50, 2)), rng.standard_normal((50, 2)), rng.standard_normal((50, 2), np.float32)
    members = [member("a", a, weight=1), member("b", b, weight=2), member("c", c32, weight=3)]
    c = c32.astype(np.float64)  # members are combined in float64
    np.testing.assert_allclose(fuse("mean", members, {})["out"], (a + b + c) / 3)
    expected = (a + 2 * b + 3 * c) / 6
    np.testing.assert_allclose(fuse("weighted_mean", members, {})["out"], expected)


def test_weighted_mean_renormalizes_over_the_members_present() -> None:
    a, c = np.ones((4, 1)), np.full((4, 1), 4.0)
    out = fuse("weighted_mean", [member("a", a, weight=1), member("c", c, weight=3)], {})["out"]
    np.testing.assert_allclose(out, np.full((4, 1), 3.25))


def reference_hard_vote(labels: list[list[object]], weights: list[float], tie: str) -> list[object]:
    out = []
    for row in zip(*labels):
        score: Counter[object] = Counter()
        for label, w in zip(row, weights):
            score[label] += w
        best = max(score.values())
        tied = {label for label, s in score.items() if abs(s - best) < 1e-9}
        out.append(min(tied) if tie == "lowest" else next(label for label in row if label in tied))
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=5),
    weights=st.lists(st.sampled_from([1.0, 0.5, 2.0]), min_size=5, max_size=5),
    tie=st.sampled_from(["first", "lowest"]),
)
def test_hard_vote_equals_a_plain_python_count_with_the_tie_rule(
    data: list[list[int]], weights: list[float], tie: str
) -> None:
    weights = weights[: len(data)]
    members = [member(f"m{i}", np.asarray(d), weight=w) for i, (d, w) in enumerate(zip(data, weights))]
    got = fuse("vote", members, {"kind": "hard", "tie": tie})["label"]
    assert got.tolist() == reference_hard_vote(data, weights, tie)


def test_hard_vote_ties_go_to_the_earliest_member_by_default() -> None:
    members = [member("a", np.array(["cat", "dog"])), member("b", np.array(["dog", "cat"]))]
    assert fuse("vote", members, {"kind": "hard"})["label"].tolist() == ["cat", "dog"]
    assert fuse("vote", members, {"kind": "hard", "tie": "lowest"})["label"].tolist() == ["cat", "cat"]


def test_align_matches_columns_by_label_not_position() -> None:
    p = np.array([[0.1, 0.2, 0.7]])
    permuted = member("p", p, classes=(2, 0, 1))
    np.testing.assert_allclose(align(permuted, [0, 1, 2]), [[0.2, 0.7, 0.1]])
    with pytest.raises(ValueError, match="no class 3"):
        align(permuted, [0, 1, 3])
    with pytest.raises(ValueError, match="declares no classes"):
        align(member("n", p), [0, 1, 2])


def test_soft_vote_with_permuted_class_columns_equals_the_aligned_average() -> None:
    rng = np.random.default_rng(1)
    a, b = probs(rng, 40, 3), probs(rng, 40, 3)
    perm = [2, 0, 1]
    # b's columns are stored permuted, with its class labels permuted the same way.
    members = [member("a", a, classes=(0, 1, 2)), member("b", b[:, perm], classes=tuple(perm), weight=3)]
    out = fuse("vote", members, {"kind": "soft", "classes": [0, 1, 2]})
    expected = (a + 3 * b) / 4
    np.testing.assert_allclose(out["probabilities"], expected)
    assert out["label"].tolist() == expected.argmax(axis=1).tolist()
    by_position = (a + 3 * b[:, perm]) / 4
    assert not np.allclose(out["probabilities"], by_position)


@settings(max_examples=40, deadline=None)
@given(perm=st.permutations(["x", "y", "z", "w"]), seed=st.integers(0, 1000))
def test_soft_vote_does_not_depend_on_any_members_column_order(perm: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = ["w", "x", "y", "z"]
    a, b = probs(rng, 10, 4), probs(rng, 10, 4)
    order = [classes.index(c) for c in perm]
    plain = [member("a", a, classes=tuple(classes)), member("b", b, classes=tuple(classes))]
    shuffled = [member("a", a, classes=tuple(classes)), member("b", b[:, order], classes=tuple(perm))]
    params = {"kind": "soft", "classes": classes}
    np.testing.assert_allclose(
        fuse("vote", shuffled, params)["probabilities"], fuse("vote", plain, params)["probabilities"]
    )


def test_mean_aligns_probabilities_when_classes_are_given() -> None:
    a = np.array([[0.2, 0.8]])
    b = np.array([[0.6, 0.4]])  # classes ("yes", "no"): P(no) = 0.4
    members = [member("a", a, classes=("no", "yes")), member("b", b, classes=("yes", "no"))]
    np.testing.assert_allclose(fuse("mean", members, {"classes": ["no", "yes"]})["out"], [[0.3, 0.7]])


def test_stack_puts_members_outputs_side_by_side_in_member_order() -> None:
    a, b = np.arange(6.0).reshape(3, 2), np.arange(3, dtype=np.float32)
    out = fuse("stack", [member("a", a), member("b", b)], {})["features"]
    np.testing.assert_array_equal(out, np.column_stack([a, b]))


def test_chain_renames_outputs_to_the_next_inputs() -> None:
    m = MemberOutput("scaler", {"features": np.ones((2, 3)), "other": np.zeros(2)}, "features")
    out = fuse("chain", [m], {"map": {"features": "X"}})
    assert list(out) == ["X"]


def test_select_scatters_routed_rows_back_in_order() -> None:
    route = np.array([1, 0, 1, 1, 0])
    low = MemberOutput("low", {"y": np.array([10.0, 40.0])}, "y", slot=0)
    high = MemberOutput("high", {"y": np.array([0.0, 2.0, 3.0])}, "y", slot=1)
    out = fuse("select", [low, high], {"route": route, "rows": 5})
    np.testing.assert_array_equal(out["y"], [0.0, 10.0, 2.0, 3.0, 40.0])
    assert fuse("select", [low], {})["y"].tolist() == [10.0, 40.0]


def test_fuse_checks_row_counts_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="rows"):
        fuse("mean", [member("a", np.ones((3, 1)))], {"rows": 4})
    with pytest.raises(ConfigError, match="unknown fusion strategy"):
        strategy("median")
    with pytest.raises(ValueError, match="no member"):
        fuse("mean", [], {})


def test_route_rows_by_bins_and_by_match() -> None:
    spec = EnsembleSpec(
        "r",
        "select",
        (Member("a@1"), Member("b@1"), Member("c@1")),
        (TensorSpec("X", "float64", (2,)),),
        ("y",),
        params={"rule": {"input": "X", "index": 1, "bins": [0.0, 5.0], "routes": [2, 0, 1]}},
    )
    table = arrays_to_table({"X": np.array([[9, -1.0], [9, 1.0], [9, 7.0], [9, 5.0]])})
    assert route_rows(spec, table).tolist() == [2, 0, 1, 1]
    spec2 = EnsembleSpec(
        "r",
        "select",
        spec.members,
        (TensorSpec("region", "string"),),
        ("y",),
        params={"rule": {"input": "region", "index": None, "match": [["eu", 1], ["us", 2]], "default": 0}},
    )
    regions = pa.table({"region": pa.array(["us", "eu", "apac"])})
    assert route_rows(spec2, regions).tolist() == [2, 1, 0]


def test_continuation_round_trips_through_the_envelope_and_old_envelopes_still_parse() -> None:
    cont = Continuation("e@1", "job", 2, 0, (0, 1), 10, "hb:reply:x", None, 5)
    body = TaskEnvelope("m", "1", (), payload_key="k", then=cont.to_dict()).to_dict()
    body["items"] = [["job~0.1", 2, 10]]
    env = TaskEnvelope.from_dict(body)
    assert env.then is not None and Continuation.from_dict(env.then) == cont
    old = {"v": 1, "model": "m", "version": "1", "items": [["j", 0, 1]], "payload_b64": ""}
    assert TaskEnvelope.from_dict(old).then is None
    with pytest.raises(PayloadError):
        Continuation.from_dict({"ensemble": "e@1"})


def test_ensemble_spec_round_trips_and_hashes_its_definition() -> None:
    spec = EnsembleSpec(
        "e",
        "weighted_mean",
        (Member("a@1", 1.0, "p"), Member("b@2", 2.0, "p")),
        (TensorSpec("X", "float64", (4,)),),
        ("p",),
    )
    again = EnsembleSpec.from_dict(spec.to_dict())
    assert again == spec and again.sha256 == spec.sha256
    assert EnsembleSpec.from_dict({**spec.to_dict(), "sha256": "", "min_members": 1}).sha256 != spec.sha256
    with pytest.raises(ConfigError, match="min_members"):
        EnsembleSpec("e", "mean", spec.members, spec.inputs, ("p",), min_members=3)


def test_result_arrays_inverts_arrays_to_table() -> None:
    arrays = {"label": np.array([1, 2]), "p": np.ones((2, 3)), "t": np.zeros((2, 2, 2)), "s": np.array(["a", "b"])}
    back = result_arrays(arrays_to_table(arrays))
    for name, values in arrays.items():
        np.testing.assert_array_equal(back[name], values)
        assert back[name].shape == values.shape
