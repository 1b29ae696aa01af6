"""A config is checked against its data set and model before any work, every problem at once."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from aggregator_service import ConfigError, ExperimentConfig, load_config
from aggregator_service.api.app import create_app
from aggregator_service.config import build_strategy, check_model_size
from broker import StrategySpec
from device_sdk.data import DATASET_FACTS, load_dataset
from device_sdk.data.errors import DataNotFound
from fedmq.settings import load_settings
from tests.brokers import skip_or_fail

MISMATCH: dict[str, Any] = {
    "name": "mismatch",
    "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 5},
    "data": {"dataset": "mnist", "devices": 10},
    "rounds": {"devices_per_round": 20},
    "training": {"lr": -1.0},
}


def test_every_problem_of_a_config_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(MISMATCH)

    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert problems[0] == "training.lr: must be positive"
    assert "model.input_shape: [64] does not fit mnist" in problems[1]
    assert "[1, 28, 28]" in problems[1]
    assert "model.num_classes: 5, but mnist has 10 classes" in problems[2]
    assert "rounds.devices_per_round: 20" in problems[3]


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_a_seed_out_of_range_is_a_config_problem_not_a_failure_at_the_build(seed: int) -> None:
    model = {"zoo": "mlp", "input_shape": [64], "num_classes": 10}
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"name": "x", "seed": seed, "model": model})

    assert caught.value.problems == ["seed: must be an integer from 0 to 2**63 - 1"]
    ExperimentConfig.from_dict({"name": "x", "seed": 2**63 - 1, "model": model})


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"rounds": {"over_selection": 1.97e305}}, "rounds.over_selection: at most 10"),
        ({"secure_aggregation": {"max_examples": 10**400}}, "leaves no precision in 32-bit"),
    ],
    ids=["infinite-cohort", "weight-past-any-float"],
)
def test_a_secure_config_with_numbers_past_any_float_is_a_problem_not_a_crash(
    extra: dict[str, Any], says: str
) -> None:
    # Found by the API fuzzer: both raised OverflowError, a 500 at POST /experiments.
    raw = {"name": "x", "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10}}
    raw |= {"secure_aggregation": {}} | extra

    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)

    assert any(says in problem for problem in caught.value.problems), caught.value.problems


def test_the_cnn_needs_the_exact_image_shape_where_flattening_models_need_the_size() -> None:
    base = {"name": "x", "data": {"dataset": "mnist", "devices": 10}}
    flat = {"zoo": "mlp", "input_shape": [784], "num_classes": 10}
    ExperimentConfig.from_dict({**base, "model": flat})  # the MLP flattens (1, 28, 28)
    cnn = {"zoo": "mnist_cnn", "input_shape": [1, 28, 28], "num_classes": 10}
    ExperimentConfig.from_dict({**base, "model": cnn})
    with pytest.raises(ConfigError, match="input_shape"):
        ExperimentConfig.from_dict({**base, "model": {**cnn, "input_shape": [4, 14, 14]}})


def test_shards_that_outnumber_the_examples_are_refused() -> None:
    raw = {
        "name": "x",
        "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10},
        "data": {"dataset": "digits", "devices": 1000, "partition": "shards"},
    }
    with pytest.raises(ConfigError, match="2000 parts"):
        ExperimentConfig.from_dict(raw)


@pytest.mark.parametrize("name", ["scaffold", "qfedavg", "dpfedavg"])
def test_strategy_settings_that_follow_from_the_config_default_from_it(name: str) -> None:
    strategy: dict[str, Any] = {"name": name}
    if name == "dpfedavg":  # the privacy choices stay the user's
        strategy.update(clip_norm=1.0, noise_multiplier=0.5)
    raw = {
        "name": "x",
        "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10},
        "data": {"devices": 12},
        "rounds": {"devices_per_round": 3},
        "training": {"lr": 0.2},
        "strategy": strategy,
    }

    config = ExperimentConfig.from_dict(raw)

    settings = config.strategy.settings
    expected = {
        "scaffold": {"num_clients": 12},
        "qfedavg": {"lr": 0.2},
        "dpfedavg": {"num_clients": 12, "sampling_rate": 0.25},
    }[name]
    assert {k: settings[k] for k in expected} == expected
    build_strategy(config.strategy)  # and the strategy builds from what is stored
    given = ExperimentConfig.from_dict({**raw, "strategy": {**strategy, **_other(name)}})
    assert {k: given.strategy.settings[k] for k in _other(name)} == _other(name)  # the user's wins


def _other(name: str) -> dict[str, Any]:
    return {
        "scaffold": {"num_clients": 40},
        "qfedavg": {"lr": 0.5},
        "dpfedavg": {"num_clients": 40, "sampling_rate": 0.5},
    }[name]


@pytest.mark.parametrize("name", sorted(DATASET_FACTS))
def test_the_data_set_facts_match_the_data_sets(name: str) -> None:
    try:
        dataset = load_dataset(name, data_dir=load_settings().data_dirs)
    except DataNotFound:
        skip_or_fail(f"{name} files are not on this machine")
    facts = DATASET_FACTS[name]
    assert facts.input_shape == dataset.input_shape
    assert facts.num_classes == dataset.num_classes
    assert facts.train_examples == len(dataset.x_train)


@pytest.fixture
def client(stack: Any) -> Iterator[FlaskClient]:
    app = create_app({"TESTING": True, "ADMIN_TOKEN": "t"}, service=stack.service)
    with app.test_client() as client:
        yield client


def test_the_api_refuses_a_mismatched_config_listing_every_problem(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/experiments", json=copy.deepcopy(MISMATCH), headers={"Authorization": "Bearer t"}
    )

    assert response.status_code == 400
    error = response.json["error"]  # type: ignore[index]
    assert error["code"] == "invalid_config"
    assert len(error["problems"]) == 4
    assert client.get("/api/v1/experiments", headers={"Authorization": "Bearer t"}).json == {
        "experiments": []
    }


PHONES: dict[str, Any] = {
    "name": "phones",
    "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "platforms": ["ios"]},
    "data": {"dataset": "digits", "devices": 4},
    "rounds": {"devices_per_round": 4},
}


def test_settings_every_phone_would_refuse_are_refused_up_front() -> None:
    raw = {**PHONES, "training": {"optimizer": "adam", "batch_size": 256}}

    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict(raw)

    problems = caught.value.problems
    assert any(p.startswith("training.optimizer: phones (['ios'])") for p in problems), problems
    assert any("batch_size: 256" in p and "at most 128" in p for p in problems), problems


def test_phones_take_sgd_with_momentum_fedprox_and_a_batch_within_their_programs() -> None:
    raw = {
        **PHONES,
        "strategy": {"name": "fedprox", "proximal_mu": 0.1},
        "training": {"batch_size": 128, "momentum": 0.9, "weight_decay": 1e-4},
    }

    assert ExperimentConfig.from_dict(raw).platforms() == ("python", "ios")
    # Without phones the same refused settings are fine.
    python_only = {**PHONES, "model": {**PHONES["model"], "platforms": ["python"]}}
    assert (
        ExperimentConfig.from_dict(
            {**python_only, "training": {"optimizer": "adam", "batch_size": 256}}
        ).training.batch_size
        == 256
    )


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"name": "krum", "f": 1}, "strategy krum: unknown setting(s) f; it takes max_updates, "),
        ({"name": "fedprox", "mu": 0.1}, "strategy fedprox: unknown setting(s) mu; it takes "),
        ({"name": "trimmed_mean"}, None),
    ],
)
def test_a_strategy_setting_it_does_not_take_is_named_with_those_it_does(
    strategy: dict[str, Any], message: str | None
) -> None:
    name = strategy.pop("name")
    if message is None:
        build_strategy(StrategySpec(name, strategy))
        return
    with pytest.raises(ConfigError) as refused:
        build_strategy(StrategySpec(name, strategy))
    assert str(refused.value).startswith(message), refused.value
    assert "__init__" not in str(refused.value)


_MLP = {"zoo": "mlp", "input_shape": [64], "num_classes": 10}


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"training": {"momentum": -0.1}}, "training.momentum: a finite number, 0 or more"),
        ({"training": {"momentum": float("nan")}}, "training.momentum"),
        ({"training": {"weight_decay": -1e-4}}, "training.weight_decay: a finite number"),
        ({"training": {"weight_decay": float("inf")}}, "training.weight_decay"),
        (
            {"data": {"partition": "shards", "shards_per_device": 0}},
            "data.shards_per_device: must be at least 1 with partition shards",
        ),
        ({"rounds": {"deadline_s": float("inf")}}, "rounds.deadline_s: at most 604800"),
        ({"rounds": {"deadline_s": 1e308}}, "rounds.deadline_s: at most 604800"),
    ],
    ids=[
        "momentum",
        "momentum-nan",
        "decay",
        "decay-inf",
        "shards",
        "deadline-inf",
        "deadline-big",
    ],
)
def test_settings_every_round_would_fail_on_are_listed_problems(
    section: dict[str, Any], says: str
) -> None:
    # Found by an audit: each passed validate, then every round failed (torch refused the
    # optimizer, the partitioner split into nothing, the deadline's timestamp overflowed).
    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"name": "x", "model": _MLP, **section})

    assert [p for p in caught.value.problems if says in p], caught.value.problems


def test_the_longest_deadline_and_zero_momentum_and_decay_are_taken() -> None:
    training = {"momentum": 0.0, "weight_decay": 0.0}
    ExperimentConfig.from_dict(
        {"name": "x", "model": _MLP, "rounds": {"deadline_s": 604800.0}, "training": training}
    )


@pytest.mark.parametrize("name", ["krum", "multikrum"])
def test_a_krum_whose_byzantine_count_the_fewest_reports_cannot_serve_is_refused(
    name: str,
) -> None:
    # Krum needs more than 2f + 2 updates; a round may commit with min_reports of them.
    rounds = {"devices_per_round": 10, "min_reports": 5}
    raw = {"name": "x", "model": _MLP, "rounds": rounds}

    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({**raw, "strategy": {"name": name, "num_byzantine": 2}})

    assert caught.value.problems == [
        f"strategy {name} (num_byzantine 2) needs at least 7 updates a round, but a round "
        "may commit with 5 (rounds.min_reports, else devices_per_round)"
    ]
    ExperimentConfig.from_dict({**raw, "strategy": {"name": name, "num_byzantine": 1}})


def test_a_bad_platforms_value_is_reported_once() -> None:
    model = {**_MLP, "platforms": "android"}

    with pytest.raises(ConfigError) as caught:
        ExperimentConfig.from_dict({"name": "x", "model": model})

    assert caught.value.problems == [
        "model.platforms: a list of names from ('python', 'android', 'ios')"
    ]


def test_the_size_limit_names_the_variable_the_operator_sets() -> None:
    config = ExperimentConfig.from_dict({"name": "x", "model": _MLP})

    with pytest.raises(ConfigError, match=r"\(FEDMQ_MAX_MODEL_PARAMETERS\)$"):
        check_model_size(config, 100)


def test_a_config_nested_too_deeply_is_one_problem_not_a_recursion_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert caught.value.problems == [f"{path} is not valid JSON: nested too deeply"]


def test_an_upper_case_toml_suffix_is_read_as_toml(tmp_path: Path) -> None:
    path = tmp_path / "T.TOML"
    path.write_text('name = "t"\n[model]\nzoo = "mlp"\ninput_shape = [64]\nnum_classes = 10\n')

    assert load_config(path).name == "t"
