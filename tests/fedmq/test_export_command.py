"""`fedmq export`: writes each platform's package, and refuses bad requests with exit 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from fedmq.cli import main

ZOO = ["--zoo", "mlp", "--input-shape", "8", "--num-classes", "3", "--hidden", "4"]
PACKAGES = {
    "android": {
        "training.pte",
        "inference.onnx",
        "checkpoint",
        "weights.safetensors",
        "package.json",
    },
    "ios": {"training.pte", "weights.ptd", "checkpoint", "weights.safetensors", "package.json"},
    "python": {"model.onnx", "model.torchscript.pt", "weights.safetensors", "package.json"},
}
MODEL_FILE = """
from torch import nn

def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 4))

def not_a_model():
    return 42

def broken():
    raise RuntimeError("no GPU here")

def wrong_width():
    return nn.Linear(5, 2)
"""


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's model file in the current folder, as `fedmq export --model` finds it."""
    (tmp_path / "h6_user_models.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check_package(out: Path, platform: str, stdout: str) -> dict[str, Any]:
    manifest = json.loads((out / "package.json").read_text())
    written = {p.name for p in out.iterdir()}
    assert PACKAGES[platform] <= written
    assert manifest["platform"] == platform
    assert set(manifest["files"]) == written - {"package.json"}
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == len(data)
        assert f"sha256 {entry['sha256'][:16]}" in stdout  # one summary line per file
    return dict(manifest)


@pytest.mark.parametrize("platform", sorted(PACKAGES))
def test_export_of_a_zoo_model_writes_the_package(
    platform: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"

    status = main(["export", *ZOO, "--platform", platform, "--out", str(out)])

    assert status == 0
    manifest = _check_package(out, platform, capsys.readouterr().out)
    assert manifest["input"]["shape"] == ["batch", 8]
    assert manifest["output"]["shape"] == ["batch", 3]


def test_max_batch_sets_the_largest_batch_of_the_phone_programs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pkg"

    status = main(["export", *ZOO, "--platform", "android", "--max-batch", "16", "--out", str(out)])

    assert status == 0
    manifest = _check_package(out, "android", capsys.readouterr().out)
    assert manifest["executorch"]["max_batch"] == 16


def test_export_of_a_user_factory(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["export", "--model", "h6_user_models:build", "--input-shape", "3,4"]
        + ["--platform", "ios", "--out", "pkg"]
    )

    assert status == 0
    manifest = _check_package(models / "pkg", "ios", capsys.readouterr().out)
    assert manifest["input"]["shape"] == ["batch", 3, 4]
    assert [p["name"] for p in manifest["parameters"]] == ["1.weight", "1.bias"]
    assert manifest["executorch"]["weights"]["key_prefix"] == "net."


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "h6_user_models"], "must be MODULE:FACTORY"),
        (["--model", "h6_no_such_module:build"], "cannot import module 'h6_no_such_module'"),
        (["--model", "h6_user_models:missing"], "has no attribute 'missing'"),
        (
            ["--model", "h6_user_models:not_a_model"],
            "returned an object of type int, not a torch.nn.Module",
        ),
        (["--model", "h6_user_models:broken"], "RuntimeError: no GPU here"),
        (["--model", "h6_user_models:wrong_width"], "export for python failed"),
        (["--zoo", "mlp"], "--zoo needs --num-classes"),
        (["--zoo", "resnet", "--num-classes", "3"], "unknown zoo model 'resnet'"),
    ],
    ids=[
        "no-colon",
        "no-module",
        "no-factory",
        "not-a-module",
        "factory-raises",
        "export-fails",
        "zoo-without-classes",
        "unknown-zoo",
    ],
)
def test_bad_requests_exit_2_with_a_clear_message(
    args: list[str], message: str, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["export", *args, "--input-shape", "12", "--platform", "python", "--out", "pkg"])

    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("fedmq export: ") and message in err
    assert "Traceback" not in err
    assert not (models / "pkg").exists()


@pytest.mark.parametrize("shape", ["0", "8,x", ""])
def test_a_bad_input_shape_exits_2(shape: str, tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["export", "--zoo", "mlp", "--num-classes", "3", "--input-shape", shape]
            + ["--platform", "python", "--out", str(tmp_path / "pkg")]
        )

    assert exit_info.value.code == 2
    assert "--input-shape: expected comma-separated positive integers" in capsys.readouterr().err


def test_a_non_empty_folder_is_refused_unless_forced(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = ["export", *ZOO, "--platform", "python", "--out", str(out)]

    refused = main(command)
    err = capsys.readouterr().err
    forced = main([*command, "--force"])

    assert refused == 2 and "is not empty; pass --force" in err
    assert forced == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "package.json").exists()
