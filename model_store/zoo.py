"""The model zoo: named torch models built from a small, JSON-able spec.

torch is imported inside the functions that need it, so reading or
validating a spec (as the service does for every experiment config) stays
cheap and torch-free.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model_store.errors import ModelSpecError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DEFAULT_MLP_HIDDEN", "ZOO_NAMES", "ModelSpec", "build_model"]

ZOO_NAMES = ("logreg", "mlp", "mnist_2nn", "mnist_cnn")

#: Hidden sizes of an ``mlp`` whose spec gives none.
DEFAULT_MLP_HIDDEN = (64,)

_CONFIG_KEYS = frozenset({"zoo", "input_shape", "num_classes", "hidden"})


def _positive_ints(value: Any, what: str) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints, or raise ``ModelSpecError``."""
    # A list or tuple only: any other iterable (a JSON object's keys) is not a shape.
    if not isinstance(value, list | tuple):
        raise ModelSpecError(f"{what} must be a list of positive integers, got {value!r}")
    items = tuple(value)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in items):
        raise ModelSpecError(f"{what} must be a list of positive integers, got {value!r}")
    return items


@dataclass(frozen=True)
class ModelSpec:
    """Which zoo model to build, for what input shape and number of classes."""

    zoo: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Validate the spec so a bad one fails before torch is touched."""
        if self.zoo not in ZOO_NAMES:
            raise ModelSpecError(f"unknown zoo model {self.zoo!r}; known: {', '.join(ZOO_NAMES)}")
        shape = _positive_ints(self.input_shape, "input_shape")
        if not shape:
            raise ModelSpecError("input_shape must not be empty")
        hidden = _positive_ints(self.hidden, "hidden")
        n = self.num_classes
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ModelSpecError(f"num_classes must be an integer >= 2, got {n!r}")
        if hidden and self.zoo != "mlp":
            raise ModelSpecError(f"hidden sizes apply only to 'mlp', not {self.zoo!r}")
        if self.zoo == "mnist_cnn" and (len(shape) != 3 or min(shape[1:]) < 4):
            raise ModelSpecError(
                f"mnist_cnn needs input_shape (channels, height, width) with height "
                f"and width >= 4, got {list(shape)}"
            )
        # Lists from JSON become tuples, so specs compare and hash by value.
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "hidden", hidden)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelSpec:
        """Build a spec from an experiment config's ``model`` section.

        Parameters
        ----------
        cfg
            ``{"zoo": "mlp", "input_shape": [64], "num_classes": 10,
            "hidden": [128]}``; ``hidden`` is optional.

        Returns
        -------
        ModelSpec
            The validated spec; ``ModelSpecError`` on a missing, unknown or
            malformed key.
        """
        if not isinstance(cfg, Mapping):
            raise ModelSpecError(f"model config must be a mapping, got {type(cfg).__name__}")
        unknown = sorted(set(cfg) - _CONFIG_KEYS)
        if unknown:
            raise ModelSpecError(
                f"unknown model config keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}"
            )
        missing = sorted({"zoo", "input_shape", "num_classes"} - set(cfg))
        if missing:
            raise ModelSpecError(f"model config lacks {missing}")
        return cls(
            zoo=cfg["zoo"],
            input_shape=cfg["input_shape"],
            num_classes=cfg["num_classes"],
            hidden=cfg.get("hidden", ()),
        )

    def parameter_count(self) -> int:
        """Return how many weights the built model has, computed without building it.

        Torch-free, so a service can refuse a model too large to allocate
        before it tries (``tests/model_store/test_model_zoo.py`` holds it to
        the built models).
        """
        if self.zoo == "mnist_cnn":
            channels, height, width = self.input_shape
            convs = channels * 32 * 25 + 32 + 32 * 64 * 25 + 64
            return convs + _dense((64 * (height // 4) * (width // 4), 512, self.num_classes))
        hidden = {"logreg": (), "mnist_2nn": (200, 200)}.get(
            self.zoo, self.hidden or DEFAULT_MLP_HIDDEN
        )
        return _dense((math.prod(self.input_shape), *hidden, self.num_classes))

    def to_config(self) -> dict[str, Any]:
        """Return the JSON-able form that :meth:`from_config` reads back.

        Returns
        -------
        dict
            ``zoo``, ``input_shape``, ``num_classes`` and ``hidden`` as lists.
        """
        return {
            "zoo": self.zoo,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
        }


def _dense(sizes: tuple[int, ...]) -> int:
    """Return the weights and biases of a chain of linear layers through ``sizes``."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes, sizes[1:], strict=False))


def build_model(spec: ModelSpec, *, seed: int) -> nn.Module:
    """Build a zoo model with initial weights fixed by ``seed``.

    The global torch RNG is forked for the build, so the caller's random
    stream is left as it was and the weights depend only on the seed.

    Parameters
    ----------
    spec
        Which model, for which input shape and number of classes.
    seed
        Seeds the weight initialization.

    Returns
    -------
    torch.nn.Module
        A TorchScript-scriptable ``nn.Sequential`` that returns logits, in
        training mode.
    """
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ModelSpecError(f"seed must be a non-negative integer, got {seed!r}")
    # devices=[]: the models are built on CPU; forking CUDA RNGs would only
    # warn or initialize CUDA for nothing.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[spec.zoo](spec)


def _logreg(spec: ModelSpec) -> nn.Module:
    """Multinomial logistic regression: flatten, one linear layer."""
    from torch import nn

    features = math.prod(spec.input_shape)
    return nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(features, spec.num_classes)),
    )


def _mlp(spec: ModelSpec, hidden: tuple[int, ...] | None = None) -> nn.Module:
    """Flatten, then Linear+ReLU per hidden size, then a linear output layer."""
    from torch import nn

    sizes = (math.prod(spec.input_shape), *(hidden or spec.hidden or DEFAULT_MLP_HIDDEN))
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False), start=1):
        layers[f"fc{i}"] = nn.Linear(n_in, n_out)
        layers[f"relu{i}"] = nn.ReLU()
    layers[f"fc{len(sizes)}"] = nn.Linear(sizes[-1], spec.num_classes)
    return nn.Sequential(layers)


def _mnist_2nn(spec: ModelSpec) -> nn.Module:
    """McMahan et al. 2017 "2NN": two hidden layers of 200 units with ReLU."""
    return _mlp(spec, hidden=(200, 200))


def _mnist_cnn(spec: ModelSpec) -> nn.Module:
    """McMahan et al. 2017 CNN: two 5x5 conv+pool blocks, fc 512, fc out."""
    from torch import nn

    channels, height, width = spec.input_shape
    # Each 2x2 max-pool halves (flooring) the size; padding 2 keeps it in conv.
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, 32, kernel_size=5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, kernel_size=5, padding=2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(flat, 512),
            relu3=nn.ReLU(),
            fc2=nn.Linear(512, spec.num_classes),
        )
    )


# Named children (not Sequential's 0, 1, 2...) give state_dict keys such as
# "fc1.weight", which are also the ONNX initializer names devices feed.
_BUILDERS = {
    "logreg": _logreg,
    "mlp": _mlp,
    "mnist_2nn": _mnist_2nn,
    "mnist_cnn": _mnist_cnn,
}
