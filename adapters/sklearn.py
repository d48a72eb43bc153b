"""scikit-learn models: skops files, or pickle/joblib files whose sha256 is pinned."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hetbatch.adapters.base import Adapter, Capabilities, ModelLoadError, Options, TensorInfo, UnsafeArtifact

__all__ = ["OUTPUT_NAMES", "SklearnAdapter", "SklearnOptions"]

# Method -> result column name; the same names skl2onnx gives its outputs.
OUTPUT_NAMES = {
    "predict": "label",
    "predict_proba": "probabilities",
    "decision_function": "scores",
    "transform": "features",
}
_TRUSTED_PREFIXES = ("sklearn.", "numpy.", "scipy.", "builtins.", "collections.")


@dataclass(frozen=True)
class SklearnOptions(Options):
    """scikit-learn options (``[options]`` of a sklearn model).

    Attributes:
        methods: result methods, in column order (default predict, plus predict_proba
            for classifiers).
        dtype: dtype of the input matrix (float64 is what scikit-learn computes in).
    """

    methods: list[str] | None = None
    dtype: str = "float64"


class SklearnAdapter(Adapter):
    """A fitted estimator or pipeline; options in ``SklearnOptions``."""

    framework = "sklearn"
    pickle_suffixes = (".pkl", ".pickle", ".joblib")
    options_type = SklearnOptions
    options: SklearnOptions
    # scikit-learn's predict runs on the calling thread: one instance per core.
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(instance_per_core=True)

    def _load(self) -> None:
        if self.artifact.suffix == ".skops":
            self.model = self._load_skops()
        elif self.is_pickle():
            import joblib  # only reached with a pinned hash: see Adapter.load

            self.model = joblib.load(self.artifact)
        else:
            raise ModelLoadError(
                f"unknown scikit-learn artifact {self.artifact.name}: use .skops (or a pinned .joblib)"
            )
        self.methods: list[str] = list(self.options.methods or self._default_methods())
        for method in self.methods:
            if method not in OUTPUT_NAMES or not hasattr(self.model, method):
                raise ModelLoadError(f"{type(self.model).__name__} has no usable method {method!r}")

    def _load_skops(self) -> Any:
        try:
            import skops.io as sio
        except ImportError as exc:
            raise ModelLoadError("skops is not installed; pip install 'hetbatch[sklearn]'") from exc
        untrusted = sio.get_untrusted_types(file=self.artifact)
        unknown = [t for t in untrusted if not t.startswith(_TRUSTED_PREFIXES)]
        if unknown and not self.pinned:
            raise UnsafeArtifact(
                f"{self.artifact.name} holds types outside scikit-learn/numpy: {unknown}; pin its sha256"
            )
        return sio.load(self.artifact, trusted=untrusted)

    def _default_methods(self) -> list[str]:
        if hasattr(self.model, "predict_proba") and hasattr(self.model, "classes_"):
            return ["predict", "predict_proba"]
        if hasattr(self.model, "predict"):
            return ["predict"]
        return ["transform"]

    def describe(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        n = getattr(self.model, "n_features_in_", None)
        inputs = [TensorInfo("X", self.options.dtype, (n,))]
        return inputs, [TensorInfo(OUTPUT_NAMES[m], "float64") for m in self.methods]

    def feature_names(self) -> list[str] | None:
        names = getattr(self.model, "feature_names_in_", None)
        return [str(n) for n in names] if names is not None else None

    def classes(self) -> list[Any] | None:
        classes = getattr(self.model, "classes_", None)
        return [c.item() if hasattr(c, "item") else c for c in classes] if classes is not None else None

    def _predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        with warnings.catch_warnings():
            # Fitted on a DataFrame, called with the same columns as an array: expected here.
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            return {OUTPUT_NAMES[m]: np.asarray(getattr(self.model, m)(x)) for m in self.methods}
