"""The experiment config's typed contract, generated from ``config.py``'s dataclasses.

Field names, types, defaults and docstrings come from ``DataConfig``,
``RoundsConfig``, ``TrainingConfig``, ``SecureAggregationConfig``,
``ExperimentConfig`` and the model zoo's ``ModelSpec``; the names a field
may take from the lists the service checks against (data sets, partitions,
optimizers, zoo models, strategies, platforms). So the schema follows
``config.py`` without a second copy, while ``ExperimentConfig.from_dict``
stays the one parser (it lists every problem at once; the schema states
types and names, not ranges or the fit of model to data).
``tests/aggregator_service/test_contracts.py`` holds the two in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from aggregator_service.config import (
    OPTIMIZERS,
    PLATFORMS,
    DataConfig,
    ExperimentConfig,
    RoundsConfig,
    SecureAggregationConfig,
    TrainingConfig,
    strategy_classes,
)
from device_sdk.data import DATASETS, PARTITIONS  # what config.py checks names against
from model_store import ModelSpec
from model_store.zoo import ZOO_NAMES

__all__ = [
    "EXAMPLE_CONFIG",
    "DataSection",
    "ExperimentConfigBody",
    "ModelSection",
    "RoundsSection",
    "SecureAggregationSection",
    "StrategySection",
    "TrainingSection",
    "choice",
]


def choice(names: Sequence[str]) -> Any:
    """Return ``Literal[names...]``: a string field whose values the service enumerates."""
    return Literal[tuple(names)]


def _json_default(value: Any) -> Any:
    """Return a dataclass default as the JSON a client would send (tuples as lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _json_default(v) for k, v in dataclasses.asdict(value).items()}
    return list(value) if isinstance(value, tuple) else value


def _from_dataclass(
    cls: type[Any],
    name: str,
    *,
    kinds: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    extra: Literal["forbid", "allow"] = "forbid",
    more: Mapping[str, tuple[Any, Any]] | None = None,
    examples: list[Any] | None = None,
) -> type[BaseModel]:
    """Return a model with ``cls``'s fields, types and defaults, some types narrowed by ``kinds``.

    A field without a dataclass default (and none in ``defaults``) is required;
    ``more`` adds fields the dataclass lacks.
    """
    hints = get_type_hints(cls)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        kind = (kinds or {}).get(field.name, hints[field.name])
        if defaults and field.name in defaults:
            default = defaults[field.name]
        elif field.default is not dataclasses.MISSING:
            default = _json_default(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = _json_default(field.default_factory())
        else:
            default = ...
        fields[field.name] = (kind, default)
    fields.update(more or {})
    # Defaults are validated too, so a section's dict default becomes that section's model.
    config = ConfigDict(
        extra=extra,
        title=name,
        validate_default=True,
        json_schema_extra={"examples": examples} if examples else None,
    )
    return create_model(name, __config__=config, __doc__=cls.__doc__, **fields)


DataSection = _from_dataclass(
    DataConfig,
    "DataConfig",
    kinds={
        "dataset": choice(DATASETS),
        "partition": choice(PARTITIONS),
    },
)
RoundsSection = _from_dataclass(RoundsConfig, "RoundsConfig")
TrainingSection = _from_dataclass(
    TrainingConfig, "TrainingConfig", kinds={"optimizer": choice(OPTIMIZERS)}
)
SecureAggregationSection = _from_dataclass(SecureAggregationConfig, "SecureAggregationConfig")
ModelSection = _from_dataclass(
    ModelSpec,
    "ModelConfig",
    kinds={"zoo": choice(ZOO_NAMES)},
    more={"platforms": (list[choice(PLATFORMS)], ["python"])},  # type: ignore[misc]
)
StrategySection = create_model(
    "StrategyConfig",
    __config__=ConfigDict(extra="allow", title="StrategyConfig"),
    __doc__="The aggregation strategy by name; its other fields are the strategy's settings.",
    name=(choice(sorted(strategy_classes())), "fedavg"),
)
EXAMPLE_CONFIG: dict[str, Any] = {
    "name": "digits-fedavg",
    "seed": 1,
    "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [32]},
    "data": {"dataset": "digits", "devices": 8, "partition": "iid"},
    "strategy": {"name": "fedavg"},
    "rounds": {"count": 3, "devices_per_round": 4, "deadline_s": 30.0},
    "training": {"epochs": 1, "lr": 0.1},
}
"""A config that runs (the test suite checks it), shown in the document and fuzzed from."""

ExperimentConfigBody = _from_dataclass(
    ExperimentConfig,
    "ExperimentConfig",
    kinds={
        "model": ModelSection,
        "data": DataSection,
        "strategy": StrategySection,
        "rounds": RoundsSection,
        "training": TrainingSection,
        "secure_aggregation": SecureAggregationSection | None,
    },
    # ``from_dict`` names an unnamed experiment so; the dataclass itself has no default.
    defaults={"name": "experiment", "strategy": {"name": "fedavg"}},
    examples=[EXAMPLE_CONFIG],
)
"""The experiment config, as POSTed and as shown back (with derived strategy settings)."""
