"""`fedmq export`: package a torch model for a device platform into a folder.

The packages are the bridges' (Android, iOS) or, for Python devices, the
standard model-version artifacts; each comes with a ``package.json`` that
lists every file's sha256. torch is imported only when a model is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store import StoreError
from model_store.export.executorch import DEFAULT_MAX_BATCH

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "EXPORT_PLATFORMS",
    "ExportUsageError",
    "PackageFile",
    "build_package",
    "export_package",
    "load_model",
    "parse_shape",
    "write_package",
]

EXPORT_PLATFORMS = ("android", "ios", "python")

MANIFEST = "package.json"


class ExportUsageError(ValueError):
    """A request `fedmq export` cannot serve: bad model reference, shape, folder, or export."""


@dataclass(frozen=True)
class PackageFile:
    """One written file of a package: its name, size and sha256."""

    name: str
    size: int
    sha256: str

    def summary(self) -> str:
        """Return the one-line summary the command prints."""
        return f"{self.name:<24} {self.size:>12,} bytes  sha256 {self.sha256[:16]}"


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,28,28"`` into ``(1, 28, 28)``; ``ValueError`` unless all are positive ints.

    Parameters
    ----------
    text
        Comma-separated sizes of one example, without the batch axis.

    Returns
    -------
    tuple
        The sizes.
    """
    parts = [part.strip() for part in text.split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return shape


def load_model(target: str) -> nn.Module:
    """Import ``MODULE:FACTORY``, call the factory and return the torch model it builds.

    The current folder is searched too, so a model file next to the user's
    shell is found as it is by ``python -m``.

    Parameters
    ----------
    target
        ``package.module:factory`` (``factory`` may be dotted, e.g. ``Net.build``);
        the factory takes no arguments.

    Returns
    -------
    torch.nn.Module
        The model; ``ExportUsageError`` when any step fails.
    """
    from torch import nn

    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ExportUsageError(f"--model must be MODULE:FACTORY, got {target!r}")
    factory = _resolve(module_name, attribute)
    if not callable(factory):
        raise ExportUsageError(f"{target} is a {type(factory).__name__}, not a callable")
    try:
        model = factory()
    except Exception as exc:  # user code: anything may come out of it
        raise ExportUsageError(f"{target}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ExportUsageError(
            f"{target}() returned an object of type {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def build_package(
    model: nn.Module,
    input_shape: Sequence[int],
    platform: str,
    *,
    num_classes: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> dict[str, bytes]:
    """Return the files of ``model``'s package for ``platform``.

    Parameters
    ----------
    model
        The torch classifier (logits out).
    input_shape
        One example's shape, without the batch axis.
    platform
        ``"android"``, ``"ios"`` or ``"python"``.
    num_classes
        Checked against the model's output width (default: read from it).
    max_batch
        The largest batch the phones' ExecuTorch programs take (android, ios).

    Returns
    -------
    dict
        ``name -> bytes``, ``package.json`` included; ``ExportUsageError`` on
        an unknown platform or a failed export.
    """
    builders: dict[str, Callable[..., dict[str, bytes]]] = {
        "android": _android,
        "ios": _ios,
        "python": _python,
    }
    if platform not in builders:
        raise ExportUsageError(f"unknown platform {platform!r}; known: {EXPORT_PLATFORMS}")
    try:
        return builders[platform](
            model, tuple(input_shape), num_classes=num_classes, max_batch=max_batch
        )
    except StoreError as exc:
        raise ExportUsageError(f"export for {platform} failed: {exc}") from exc
    except Exception as exc:  # the user's model or a converter failing in its own way
        raise ExportUsageError(
            f"export for {platform} failed: {type(exc).__name__}: {exc}"
        ) from exc


def write_package(files: dict[str, bytes], out: Path, *, force: bool = False) -> list[PackageFile]:
    """Write ``files`` into the folder ``out`` (created); return what was written.

    Parameters
    ----------
    files
        ``name -> bytes``.
    out
        The folder; refused when it holds anything, unless ``force``.
    force
        Write into a non-empty folder, replacing files of the same names.

    Returns
    -------
    list
        One :class:`PackageFile` per file, in ``files`` order.
    """
    _check_out(out, force=force)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
    except OSError as exc:
        raise ExportUsageError(f"cannot write the package into {out}: {exc}") from exc
    return [PackageFile(n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()]


def export_package(
    *,
    platform: str,
    out: Path,
    input_shape: Sequence[int],
    model: str | None = None,
    zoo: str | None = None,
    num_classes: int | None = None,
    hidden: Sequence[int] = (),
    seed: int = 0,
    force: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_parameters: int | None = None,
) -> list[PackageFile]:
    """Build a model (``MODULE:FACTORY`` or a zoo name) and write its package to ``out``.

    Parameters
    ----------
    platform
        ``"android"``, ``"ios"`` or ``"python"``.
    out
        The folder to write (created; must be empty unless ``force``).
    input_shape
        One example's shape, without the batch axis.
    model
        ``MODULE:FACTORY``; exactly one of ``model`` and ``zoo`` is given.
    zoo
        A zoo model name; needs ``num_classes``.
    num_classes
        The number of classes (checked against ``model``'s output).
    hidden
        Hidden sizes of a zoo ``mlp``.
    seed
        Seeds a zoo model's initial weights.
    force
        Write into a non-empty folder.
    max_batch
        The largest batch the phones' ExecuTorch programs take (android, ios).
    max_parameters
        The most weights a zoo model may have (default: the service's limit),
        checked before torch builds it.

    Returns
    -------
    list
        The files written; ``ExportUsageError`` on any user error or failed export.
    """
    if (model is None) == (zoo is None):
        raise ExportUsageError("give exactly one of --model MODULE:FACTORY and --zoo NAME")
    _check_out(out, force=force)  # before the slow export, not only after it
    built = (
        load_model(model)
        if model is not None
        else _zoo_model(zoo, input_shape, num_classes, hidden, seed, max_parameters)
    )
    with _without_onnxruntime_info():
        files = build_package(
            built, input_shape, platform, num_classes=num_classes, max_batch=max_batch
        )
    return write_package(files, out, force=force)


def _zoo_model(
    name: str | None,
    shape: Sequence[int],
    num_classes: int | None,
    hidden: Sequence[int],
    seed: int,
    max_parameters: int | None,
) -> nn.Module:
    """Build a zoo model from the command's options (one over the size limit is refused)."""
    from aggregator_service.config import check_spec_size
    from aggregator_service.errors import ConfigError
    from model_store import ModelSpec, build_model

    if num_classes is None:
        raise ExportUsageError("--zoo needs --num-classes")
    try:
        spec = ModelSpec(str(name), tuple(shape), num_classes, hidden=tuple(hidden))
        check_spec_size(spec, max_parameters)  # torch would fail or take the host's memory
        return build_model(spec, seed=seed)
    except (StoreError, ConfigError) as exc:
        raise ExportUsageError(str(exc)) from exc


def _resolve(module_name: str, attribute: str) -> Any:
    """Import ``module_name`` (the current folder searched too); walk the dotted ``attribute``."""
    try:
        with _cwd_on_path():
            obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or the module's own import-time failure
        raise ExportUsageError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ExportUsageError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Put the current folder first on ``sys.path`` for the duration of an import."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _check_out(out: Path, *, force: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise ExportUsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not force and any(out.iterdir()):
        raise ExportUsageError(f"--out {out} is not empty; pass --force to write into it")


def _android(
    model: nn.Module, shape: tuple[int, ...], *, num_classes: int | None, max_batch: int
) -> dict[str, bytes]:
    from android_bridge.package import build_android_package

    return build_android_package(model, shape, num_classes=num_classes, max_batch=max_batch)


def _ios(
    model: nn.Module, shape: tuple[int, ...], *, num_classes: int | None, max_batch: int
) -> dict[str, bytes]:
    from ios_bridge.package import build_ios_package

    return build_ios_package(model, shape, num_classes=num_classes, max_batch=max_batch)


def _python(
    model: nn.Module, shape: tuple[int, ...], *, num_classes: int | None, max_batch: int
) -> dict[str, bytes]:
    """Weights, ONNX graph, trainable TorchScript and a manifest, for Python devices.

    ``max_batch`` concerns the phones only: TorchScript takes any batch.
    """
    from model_store.artifacts import ONNX, TORCHSCRIPT, WEIGHTS, encode_weights, state_to_numpy
    from model_store.export import export_onnx, export_torchscript
    from model_store.export.classifier import output_classes
    from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME

    classes = output_classes(model, shape, num_classes)
    weights = state_to_numpy(model)
    files = {
        WEIGHTS: encode_weights(weights),
        ONNX: export_onnx(model, shape),
        TORCHSCRIPT: export_torchscript(model),
    }
    doc = {
        "format_version": 1,
        "platform": "python",
        "onnx_opset": ONNX_OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", *shape], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", classes], "dtype": "float32"},
        "labels": {"dtype": "int64", "shape": ["batch"], "format": "class_index"},
        "loss": "cross_entropy",
        "optimizer": {
            "names": ["sgd", "adam"],
            "chosen_by": "task.training.optimizer",
            "learning_rate_from": "task.training.lr",
        },
        "parameters": [
            {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
            for name, array in weights.items()
        ],
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in files.items()
        },
    }
    files[MANIFEST] = (json.dumps(doc, indent=2) + "\n").encode()
    return files


@contextlib.contextmanager
def _without_onnxruntime_info() -> Iterator[None]:
    """Drop ONNX Runtime's info lines from the process's stderr, keep everything else.

    ORT's training-artifact generator logs dozens of info lines straight to
    file descriptor 2 from C++, whatever the Python-side log severity says;
    they would bury the summary. Warnings and errors are written back.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if b"[I:onnxruntime" not in line]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
