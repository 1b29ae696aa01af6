"""The model the kit hands a device: a zoo model's weights and artifacts, and fresh copies of them.

A device keeps verified artifacts cached by sha256, so a check that must see a
download gives the task weights the device has never seen: the same model with
one parameter moved by a few float32 steps, too little to change training.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from broker import decode_weights, encode_weights
from model_store import WEIGHTS, ModelSpec, build_initial_artifacts
from model_store.ptd import PTD_KEY_PREFIX, PTD_WEIGHTS, rewrite_weights

DEFAULT_SPEC = ModelSpec("mlp", (64,), 10)
"""A tiny MLP on 64 inputs and 10 classes (scikit-learn's digits): exports in seconds."""

_NUDGES = itertools.count(secrets.randbelow(1 << 20))
"""Distinct within this process, random across processes: a phone's cache outlives a run."""


@dataclass(frozen=True)
class KitModel:
    """A model version as the kit serves it.

    Parameters
    ----------
    spec
        The zoo model.
    weights
        The parameters by name (float32).
    artifacts
        Every other file a task lists, by name (``model.onnx``,
        ``model.torchscript.pt``, and a platform package's ``android/...`` or
        ``ios/...`` files), without the packages' own weights files: a task's
        weights are its ``model``, as the service sends them.
    platform
        The platform the artifacts were built for.
    phone_weights_template
        A phone package's ExecuTorch weights file, from which each task's own
        is made (None for Python devices).
    """

    spec: ModelSpec
    weights: Mapping[str, np.ndarray]
    artifacts: Mapping[str, bytes]
    platform: str
    phone_weights_template: bytes | None = None

    @classmethod
    def build(
        cls, platform: str = "python", spec: ModelSpec = DEFAULT_SPEC, seed: int = 0
    ) -> KitModel:
        """Build the model and its artifacts, with ``platform``'s package (torch needed).

        Raises
        ------
        ValueError
            No packager exists for ``platform``.
        """
        from fedmq.platforms import platform_packagers  # the bridges load only when asked for

        built, _metadata = build_initial_artifacts(spec, seed=seed)
        files = {name: data for name, (data, _media) in built.items()}
        if platform != "python":
            packagers = platform_packagers()
            if platform not in packagers:
                known = ", ".join(["python", *packagers])
                raise ValueError(f"no package for platform {platform!r}; known: {known}")
            files.update(
                {name: data for name, (data, _media) in packagers[platform](spec, seed).items()}
            )
        weights = decode_weights(files[WEIGHTS], copy=True)
        # Each version's weights travel as the task's model and, for a phone, as
        # that version's weights file; the packages' own copies hold version 0's.
        ptd = f"{platform}/{PTD_WEIGHTS}"
        artifacts = {
            name: data for name, data in files.items() if not name.endswith(WEIGHTS) and name != ptd
        }
        return cls(spec, weights, artifacts, platform, files.get(ptd))

    def phone_weights(self, model: bytes) -> dict[str, bytes]:
        """Return the phone's weights file holding the safetensors ``model``, by artifact name."""
        if self.phone_weights_template is None:
            return {}
        data = rewrite_weights(
            self.phone_weights_template, decode_weights(model), key_prefix=PTD_KEY_PREFIX
        )
        return {f"{self.platform}/{PTD_WEIGHTS}": data}

    def fresh_weights(self) -> bytes:
        """Return the weights as safetensors no device has seen: one value moved a few ulps."""
        weights = {
            name: np.ascontiguousarray(array, np.float32) for name, array in self.weights.items()
        }
        first = next(iter(weights))
        moved = weights[first].copy()
        # Whole float32 steps: adding a tiny float to a larger one could round to nothing.
        moved.reshape(-1).view(np.uint32)[0] += np.uint32(1 + next(_NUDGES) % (1 << 16))
        weights[first] = moved
        return encode_weights(weights)

    def spec_of_weights(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Return the names, shapes and dtypes an update must have."""
        return {name: (tuple(array.shape), "float32") for name, array in self.weights.items()}
