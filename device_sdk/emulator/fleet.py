"""An emulated fleet: N devices in one process, each with its own partition of a data set."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from broker import Transport
from device_sdk.app import DeviceApp
from device_sdk.client import DeviceClient
from device_sdk.data import load_dataset, partition
from device_sdk.fetch import ArtifactFetcher
from device_sdk.trainers.torchscript import ModuleCache, TorchScriptTrainer

Runner = Callable[[Callable[[], None]], None]


def device_name(index: int, prefix: str = "emu") -> str:
    """Return the id of the fleet's ``index``-th device; the index fixes its data."""
    return f"{prefix}-{index:04d}"


class Fleet:
    """Emulated devices sharing one transport, one artifact cache and one module cache.

    Device ``i`` holds partition ``i`` of the experiment's data set, so the same
    device id trains on the same examples in every run and every process.

    Parameters
    ----------
    transport
        The bus every device uses.
    data
        The experiment config's ``data`` section (dataset, devices, partition, alpha, ...).
    seed
        The experiment's seed: fixes the partition and the devices' batch order.
    indices
        Which of the partition's devices to run (default: all of them).
    experiment_id
        Restrict the devices to one experiment.
    """

    def __init__(
        self,
        transport: Transport,
        data: Mapping[str, Any],
        *,
        seed: int,
        indices: range | None = None,
        experiment_id: str | None = None,
        fetcher: ArtifactFetcher | None = None,
        run: Runner | None = None,
        prefix: str = "emu",
    ) -> None:
        dataset = load_dataset(str(data.get("dataset", "digits")))
        size = int(data.get("devices", 20))
        parts = partition(
            dataset.y_train,
            size,
            str(data.get("partition", "iid")),
            seed=seed,
            alpha=float(data.get("alpha", 0.5)),
            shards_per_device=int(data.get("shards_per_device", 2)),
        )
        self.fetcher = fetcher or ArtifactFetcher()
        modules = ModuleCache()
        self.devices: list[DeviceClient] = []
        for i in indices if indices is not None else range(size):
            idx = parts[i]
            app = DeviceApp()
            app.on_train(
                TorchScriptTrainer(
                    dataset.x_train[idx], dataset.y_train[idx], seed=seed, modules=modules
                )
            )
            self.devices.append(
                DeviceClient(
                    app,
                    transport,
                    device_name(i, prefix),
                    self.fetcher,
                    platform="emulated",
                    experiment_id=experiment_id,
                    run=run,
                )
            )

    def start(self) -> None:
        """Bring every device online."""
        for device in self.devices:
            device.start()

    def summary(self) -> dict[str, int]:
        """Return the fleet's totals: tasks, updates sent, failures, rejections."""
        return {
            "devices": len(self.devices),
            "tasks": sum(d.stats.tasks for d in self.devices),
            "updates_sent": sum(d.stats.updates_sent for d in self.devices),
            "failures": sum(d.stats.failures for d in self.devices),
            "rejections": sum(len(d.stats.rejections) for d in self.devices),
        }
