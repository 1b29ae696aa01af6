"""The config's typed contract stays in step with ``config.py``: same fields, defaults, verdicts."""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from pydantic import BaseModel

from aggregator_service.api import config_contract as contracts
from aggregator_service.config import (
    DataConfig,
    ExperimentConfig,
    RoundsConfig,
    TrainingConfig,
    strategy_classes,
)
from aggregator_service.errors import ConfigError
from model_store import ModelSpec
from tests.conftest import SMALL_CONFIG

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
SECTIONS: list[tuple[type[Any], type[BaseModel]]] = [
    (DataConfig, contracts.DataSection),
    (RoundsConfig, contracts.RoundsSection),
    (TrainingConfig, contracts.TrainingSection),
]
SCHEMA = Draft202012Validator(contracts.ExperimentConfigBody.model_json_schema())


def _schema_problems(raw: Any) -> list[str]:
    return [error.message for error in SCHEMA.iter_errors(raw)]


@pytest.mark.parametrize(("dataclass", "model"), SECTIONS, ids=lambda v: v.__name__)
def test_each_section_model_has_its_dataclass_fields_and_defaults(
    dataclass: type[Any], model: type[BaseModel]
) -> None:
    defaults = dataclasses.asdict(dataclass())

    assert list(model.model_fields) == list(defaults)
    assert {name: f.default for name, f in model.model_fields.items()} == defaults


def test_the_model_section_is_the_model_spec_plus_platforms() -> None:
    spec_fields = [f.name for f in dataclasses.fields(ModelSpec)]

    assert list(contracts.ModelSection.model_fields) == [*spec_fields, "platforms"]


def test_the_strategy_names_are_the_services() -> None:
    schema = contracts.StrategySection.model_json_schema()

    assert schema["properties"]["name"]["enum"] == sorted(strategy_classes())
    assert schema["additionalProperties"] is True


def test_what_the_schema_fills_in_is_what_from_dict_fills_in() -> None:
    minimal = {"model": dict(SMALL_CONFIG["model"])}

    parsed = ExperimentConfig.from_dict(minimal)
    modelled = contracts.ExperimentConfigBody.model_validate(minimal).model_dump(mode="json")

    # The model section is kept as given; its platforms default as ``platforms()`` says.
    assert modelled.pop("model") == {**minimal["model"], "platforms": list(parsed.platforms())}
    assert modelled == {k: v for k, v in parsed.to_dict().items() if k != "model"}


def test_the_documents_example_config_runs() -> None:
    parsed = ExperimentConfig.from_dict(contracts.EXAMPLE_CONFIG)

    assert _schema_problems(contracts.EXAMPLE_CONFIG) == []
    assert _schema_problems(parsed.to_dict()) == []


def _example_files() -> list[Path]:
    return sorted(p for p in CONFIGS.iterdir() if p.suffix in (".json", ".toml"))


@pytest.mark.parametrize("path", _example_files(), ids=lambda p: p.name)
def test_the_shipped_configs_and_their_parsed_form_match_the_schema(path: Path) -> None:
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)

    parsed = ExperimentConfig.from_dict(raw).to_dict()

    assert _schema_problems(raw) == []
    assert _schema_problems(parsed) == []


# Values of every JSON type, near the edges the parser cares about.
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "sgd", "adam", "iid", "shards", "mnist1d", "mlp", "ios"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=5,
)


def _nodes(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Return the path of every node of a JSON value, containers included."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict | list):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            paths += _nodes(item, (*prefix, key))
    return paths


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_config_that_from_dict_accepts_is_refused_by_the_schema(data: st.DataObject) -> None:
    raw = copy.deepcopy(SMALL_CONFIG)
    where = data.draw(st.sampled_from(_nodes(raw)), label="field")
    node: Any = raw
    for key in where[:-1]:
        node = node[key]
    if isinstance(node, dict) and data.draw(st.booleans(), label="add a sibling"):
        where = (*where[:-1], data.draw(st.text(max_size=8), label="new key"))
    node[where[-1]] = data.draw(_VALUES, label="value")

    try:
        parsed = ExperimentConfig.from_dict(raw).to_dict()
    except ConfigError:
        return  # refused: the schema may or may not say why (ranges, fit to the data set)

    assert _schema_problems(raw) == [], raw
    assert _schema_problems(parsed) == [], parsed
