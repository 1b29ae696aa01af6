"""Bad flags and paths end in one line before any work: no traceback, no wasted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import model_store
from broker.topics import is_valid_segment
from fedmq import compose, edge, processes
from fedmq.argtypes import UsageError
from fedmq.cli import build_parser, default_worker_name, main
from fedmq.devices import ago
from fedmq.edge import EdgeOptions
from fedmq.processes import FleetOptions
from fedmq.settings import Settings

NOPE = "/proc/nope/x"
"""A path no one can create, root included."""


def _must_not_run(*_: Any, **__: Any) -> Any:
    raise AssertionError("the command started its work despite bad input")


@pytest.mark.parametrize("hostname", ["ip-10-0-0-1.ec2.internal", "my host!", "x" * 300])
def test_the_default_worker_name_is_a_valid_id_for_any_hostname(hostname: str) -> None:
    # Execute
    name = default_worker_name(hostname)

    # Assert: deterministic (a restart resumes the session) and usable as a key name
    assert is_valid_segment(name), name
    assert name == default_worker_name(hostname)


def test_a_dotted_hostname_maps_its_dots_to_dashes() -> None:
    assert (
        default_worker_name("ip-10-0-0-1.ec2.internal") == "fedmq-worker-ip-10-0-0-1-ec2-internal"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["server", "--port", "99999"],
        ["server", "--port", "-1"],
        *(["server", "--recovery-grace", v] for v in ("-5", "nan", "inf", "1e308")),
        ["fleet", "--devices", "1", "--seed", "-1"],
        ["fleet", "--devices", "1", "--first", "-5"],
        *(["fleet", "--devices", "1", "--heartbeat", v] for v in ("0", "-1", "nan", "1e308")),
        *(
            ["conformance", "--device-id", "d", "--device-key", "k", flag, v]
            for flag in ("--timeout", "--come-back-after")
            for v in ("-1", "nan", "inf", "1e308")
        ),
        ["export", "--zoo", "mlp", "--input-shape", "4", "--platform", "python", "--out", "o"]
        + ["--seed", "-1"],
        ["model", "pull", "e", "--version", "-1"],
    ],
    ids=lambda argv: " ".join(argv[:1] + argv[-2:]),
)
def test_a_flag_out_of_its_range_is_refused_by_the_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)

    # Assert
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}" in capsys.readouterr().err


def test_a_host_that_names_no_address_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path))
    monkeypatch.setattr(processes, "run_server", _must_not_run)

    # Execute
    code = main(["server", "--host", "999.1.1.1", "--port", "0", "--broker", "memory://"])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith("fedmq: --host 999.1.1.1: not an address or name to listen on")


@pytest.mark.parametrize("command", ["demo", "simulate"])
@pytest.mark.parametrize("where", ["file", "unmakeable"])
def test_an_out_folder_that_cannot_be_written_stops_the_run_before_its_rounds(
    command: str,
    where: str,
    tmp_path: Path,
    small_config: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path))
    monkeypatch.setattr(compose, "run_experiment", _must_not_run)
    out = tmp_path / "taken"
    out.write_text("")
    if where == "unmakeable":
        out = Path(NOPE)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(small_config().to_dict()))
    argv = ["demo", "--broker", "memory://"] if command == "demo" else ["simulate", str(config)]

    # Execute
    code = main([*argv, "--out", str(out)])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith(f"fedmq: --out {out}")


def test_simulate_refuses_a_model_above_the_size_limit_before_building_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: 6.4e11 weights, which torch would try to allocate
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path))
    monkeypatch.setattr(compose, "run_experiment", _must_not_run)
    model = {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [100000, 100000]}
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"name": "huge", "model": model}))

    # Execute
    code = main(["simulate", str(path)])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (2, 1), err
    assert "(FEDMQ_MAX_MODEL_PARAMETERS)" in err[0]


def test_export_refuses_a_zoo_model_above_the_size_limit_before_building_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path))
    monkeypatch.setattr(model_store, "build_model", _must_not_run)
    argv = ["export", "--zoo", "mlp", "--input-shape", "100000,100000", "--num-classes", "10"]

    # Execute
    code = main([*argv, "--platform", "python", "--out", str(tmp_path / "pkg")])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith("fedmq export: model: 640000000714 parameters, above")


def _settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path, broker="memory://", server="http://127.0.0.1:9")


def test_an_unwritable_health_file_stops_each_process_before_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: whatever would start the component fails the test
    for module, name in [
        (processes, "working"),
        (processes, "fleet_running"),
        (processes, "TransportPool"),
        (edge, "edge_device_running"),
    ]:
        monkeypatch.setattr(module, name, _must_not_run)
    settings, health = _settings(tmp_path), Path(NOPE)
    device = EdgeOptions(device_id="d", key_file=tmp_path / "k", data=tmp_path / "x.npz")
    runs = [
        lambda: processes.run_worker(settings, name="w", health_file=health),
        lambda: processes.run_bridge(settings, region="memory://", name="r", health_file=health),
        lambda: processes.run_fleet(settings, FleetOptions(devices=1), health_file=health),
        lambda: edge.run_edge_device(settings, device, health_file=health),
    ]

    # Execute / Assert
    for run in runs:
        with pytest.raises(UsageError, match=f"--health-file {NOPE}: cannot write it"):
            run()


def test_the_bridge_gives_its_two_sides_distinct_stable_client_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record the client id each side connects with
    client_ids: list[str] = []

    class Pool:
        def __init__(self, url: str) -> None:
            self.url = url

        def __call__(self, client_id: str) -> str:
            client_ids.append(client_id)
            return client_id

        def close(self) -> None:
            pass

    class StubBridge:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(processes, "TransportPool", Pool)
    monkeypatch.setattr(processes, "Bridge", StubBridge)
    monkeypatch.setattr(processes, "wait_for_signal", lambda _health=None: None)

    # Execute: a region on the root's very broker, as in a one-broker test deployment
    processes.run_bridge(_settings(tmp_path), region="memory://", name="r1")

    # Assert
    assert sorted(client_ids) == ["fedmq-bridge-r1-region", "fedmq-bridge-r1-root"]


def test_a_checked_health_file_looks_unhealthy_until_the_process_is_up(tmp_path: Path) -> None:
    health = tmp_path / "health"

    processes.check_health_file(health)

    assert health.stat().st_mtime == 0  # dated 1970: a "modified within 30 s" check fails


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.2, "just now"), (42.9, "42 s ago"), (300, "5 min ago"), (3 * 3600 + 5, "3 h ago")],
)
def test_devices_list_shows_when_a_device_was_last_seen_as_an_age(
    seconds: float, shown: str
) -> None:
    assert ago(seconds) == shown


def test_a_run_on_data_this_machine_lacks_stops_before_its_first_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mnist.json"
    root = Path(__file__).parents[2]
    raw = json.loads((root / "experiments" / "configs" / "mnist_2nn_iid.json").read_text())
    config.write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)  # the shared MNIST folder is found from the project root
    monkeypatch.setenv("FEDMQ_DATA_DIR", str(tmp_path / "empty"))

    assert main(["validate", str(config)]) == 0  # valid for a service all the same
    validated = capsys.readouterr()
    assert "valid." in validated.out
    assert "note: `simulate` and fleets on this machine cannot run it yet" in validated.err
    assert "MNIST files" in validated.err

    assert main(["simulate", str(config)]) != 0
    simulated = capsys.readouterr()
    assert "round" not in simulated.out  # no header: it stopped before the run
    assert "MNIST files" in simulated.err
