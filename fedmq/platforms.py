"""Device platforms at the composition root: their model packages and emulated trainers.

The service and the fleet do not import the bridges; this module hands them
what a platform needs, importing a bridge (and torch or ONNX Runtime) only
when that platform is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from aggregator_service.config import PLATFORMS
from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import TrainerFactory, torchscript_trainers
from model_store import ModelSpec, build_model

if TYPE_CHECKING:
    from aggregator_service.rounds.catalog import Packager


def _android(spec: ModelSpec, seed: int) -> Mapping[str, tuple[bytes, str]]:
    from android_bridge.package import android_artifacts

    return android_artifacts(build_model(spec, seed=seed), spec.input_shape)


def _ios(spec: ModelSpec, seed: int) -> Mapping[str, tuple[bytes, str]]:
    from ios_bridge.package import ios_artifacts

    return ios_artifacts(build_model(spec, seed=seed), spec.input_shape)


def platform_packagers() -> dict[str, Packager]:
    """Return the packagers a service offers for ``model.platforms``."""
    return {"android": _android, "ios": _ios}


def trainers_for(platform: str, seed: int) -> TrainerFactory:
    """Return the emulated trainers of one platform."""
    if platform == "python":
        return torchscript_trainers(seed)
    if platform == "android":
        from android_bridge.device import android_trainers

        return android_trainers(seed)
    if platform == "ios":
        from ios_bridge.device import ios_trainers

        return ios_trainers(seed)
    raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}")


def parse_mix(text: str) -> dict[str, float]:
    """Parse ``python:2,android:1,ios:1`` into platform shares that sum to 1."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in PLATFORMS:
            raise ValueError(f"unknown platform {name!r} in {text!r}; known: {PLATFORMS}")
        try:
            shares[name] = float(weight or 1)
        except ValueError:
            raise ValueError(f"bad share {weight!r} for {name} in {text!r}") from None
        if shares[name] <= 0:
            raise ValueError(f"the share of {name} must be positive in {text!r}")
    if not shares:
        raise ValueError("a platform mix names at least one platform")
    total = sum(shares.values())
    return {name: weight / total for name, weight in shares.items()}


def assign_platforms(mix: Mapping[str, float], size: int) -> list[str]:
    """Give each of ``size`` device indices a platform, in contiguous blocks by share.

    Blocks (not a random draw) keep a device's platform a function of its
    index and the mix alone, so every run and every process agrees.
    """
    counts = {name: int(share * size) for name, share in mix.items()}
    leftover = size - sum(counts.values())
    for name in sorted(mix, key=lambda n: mix[n] * size - counts[n], reverse=True)[:leftover]:
        counts[name] += 1
    return [name for name in mix for _ in range(counts[name])]


def mixed_trainers(platforms: Sequence[str], seed: int) -> tuple[TrainerFactory, list[str]]:
    """Return a trainer factory that gives device ``i`` a trainer of ``platforms[i]``.

    Also returns the platform names, for the devices to report at check-in.
    A platform's trainers are built when its first device is: a process
    loads a runtime (ExecuTorch's, TorchScript's) only for the platforms its
    devices run.
    """
    factories: dict[str, TrainerFactory] = {}

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        platform = platforms[index]
        if platform not in factories:
            factories[platform] = trainers_for(platform, seed)
        return factories[platform](x, y, index)

    return make, list(platforms)
