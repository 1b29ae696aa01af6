"""`fedmq simulate`: deterministic, and writes the promised result files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedmq.cli import main
from fedmq.compose import simulate


def test_same_config_and_seed_give_bit_identical_models(small_config: Any) -> None:
    config = small_config()

    first = simulate(config)
    second = simulate(config)
    other_seed = simulate(small_config(seed=4))

    assert first.final_weights == second.final_weights
    assert first.final_weights != other_seed.final_weights
    assert [r.metrics for r in first.rounds] == [r.metrics for r in second.rounds]


def test_simulation_learns_and_every_round_commits(small_config: Any) -> None:
    result = simulate(small_config(rounds={"count": 3}))

    assert [(r.number, r.state, len(r.accepted)) for r in result.rounds] == [
        (1, "committed", 4),
        (2, "committed", 4),
        (3, "committed", 4),
    ]
    losses = [r.metrics["loss"] for r in result.rounds]
    assert losses[-1] < losses[0]


def test_cli_simulate_writes_csv_json_models_and_plot(
    tmp_path: Path, small_config: Any, capsys: Any
) -> None:
    config_path = tmp_path / "exp.json"
    config_path.write_text(json.dumps(small_config().to_dict()))
    out = tmp_path / "out"

    status = main(["simulate", str(config_path), "--rounds", "2", "--out", str(out)])

    assert status == 0
    with (out / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["round"] for r in rows] == ["1", "2"]
    for column in ("round", "selected", "reported", "accepted", "loss", "accuracy", "duration_s"):
        assert rows[0][column] != ""
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["accuracy"] == float(rows[-1]["accuracy"])
    initial = load_file(out / "model_initial.safetensors")
    final = load_file(out / "model_final.safetensors")
    assert set(initial) == set(final) and not np.array_equal(
        initial["fc1.weight"], final["fc1.weight"]
    )
    assert (out / "accuracy_loss.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "round" in printed and "committed" in printed


def test_cli_reports_a_bad_config_clearly(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "name": "x",
                "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10},
                "rounds": {"count": -1},
            }
        )
    )

    status = main(["simulate", str(path)])

    assert status == 2
    assert "rounds.count" in capsys.readouterr().err


def test_cli_reads_toml_configs(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "exp.toml"
    path.write_text(
        'name = "toml"\nseed = 1\n'
        '[model]\nzoo = "logreg"\ninput_shape = [64]\nnum_classes = 10\n'
        '[data]\ndataset = "digits"\ndevices = 4\npartition = "iid"\n'
        "[rounds]\ncount = 1\ndevices_per_round = 2\n"
    )

    assert main(["simulate", str(path)]) == 0
    assert "final accuracy" in capsys.readouterr().out


def test_cli_missing_config_file_is_an_error(tmp_path: Path, capsys: Any) -> None:
    assert main(["simulate", str(tmp_path / "nope.json")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_a_run_stops_early_once_its_stop_condition_holds(small_config: Any) -> None:
    result = simulate(small_config(rounds={"count": 5}), stop_when=lambda r: r.number == 2)

    assert [r.number for r in result.rounds] == [1, 2]
    assert all(r.state == "committed" for r in result.rounds)


def test_validate_and_simulate_list_every_problem_one_line_each(
    tmp_path: Path, capsys: Any
) -> None:
    path = tmp_path / "mismatch.json"
    path.write_text(
        json.dumps(
            {
                "name": "mismatch",
                "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10},
                "data": {"dataset": "mnist", "devices": 10},
                "training": {"lr": -1.0},
            }
        )
    )

    for command in ("validate", "simulate"):
        assert main([command, str(path)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 2, lines
        assert all(line.startswith("fedmq: invalid config: ") for line in lines)
        assert "does not fit mnist" in lines[1]


def test_validate_prints_the_settings_a_config_resolves_to(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "scaffold.json"
    model = {"zoo": "mlp", "input_shape": [64], "num_classes": 10}
    path.write_text(json.dumps({"name": "s", "model": model, "strategy": {"name": "scaffold"}}))

    assert main(["validate", str(path)]) == 0
    assert "scaffold {'num_clients': 20}" in capsys.readouterr().out


def test_simulate_exits_non_zero_with_one_line_per_abandoned_round(
    small_config: Any, tmp_path: Path, capsys: Any
) -> None:
    # Every device answers 100 s after a 5 s deadline (emulated time): every round is
    # abandoned. (A Krum whose f its cohort cannot serve did this once; validate refuses it.)
    config = small_config(rounds={"count": 2, "deadline_s": 5.0})
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(config.to_dict()))
    delays = tmp_path / "delays.json"
    delays.write_text(json.dumps({str(i): 100 for i in range(config.data.devices)}))

    assert main(["simulate", str(path), "--profile", str(delays)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "fedmq: round 1 abandoned: only 0 valid update(s), 3 needed"


def test_validate_refuses_a_model_above_the_services_size_limit(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wide.json"
    model = {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [64]}
    path.write_text(json.dumps({"name": "wide", "model": model}))
    monkeypatch.setenv("FEDMQ_MAX_MODEL_PARAMETERS", "4000")  # the model has 4,810

    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedmq: invalid config: model: 4810 parameters, above this service's limit of 4000 "
        "(FEDMQ_MAX_MODEL_PARAMETERS)"
    )
    monkeypatch.setenv("FEDMQ_MAX_MODEL_PARAMETERS", "4810")
    assert main(["validate", str(path)]) == 0
