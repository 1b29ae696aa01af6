"""A worker's share of one round: the strategy state it folds into and the ledger beside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aggregator_service.checkpoints import RoundCheckpoint
from aggregator_service.strategies import Strategy
from aggregator_service.tally import Tally
from aggregator_service.types import Weights
from broker import RoundOpened, weights_spec


@dataclass
class Share(Tally):
    """Everything a worker tracks about its share of the round it is aggregating."""

    opened: RoundOpened
    current: Weights
    strategy: Strategy
    state: Any
    reporters: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)
    """Task ids answered here (a task is answered once)."""
    joined: bool = False
    """Whether this worker is on the round's roster (it joins before its first fold)."""
    dirty: bool = False
    """Whether the share changed since its last checkpoint (a fold or a counted refusal)."""
    saved: RoundCheckpoint | None = None
    """The last checkpoint, as saved (its tensors are the state's own arrays)."""
    unsent: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))
    """Devices that reported (and those accepted) since the last ``RoundProgress``."""
    selected: frozenset[str] = field(init=False)
    """The round's cohort as a set: asked once per update, of cohorts of thousands."""

    def __post_init__(self) -> None:
        self.selected = frozenset(self.opened.selected)

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Return the names, shapes and dtypes every update must have."""
        return weights_spec(self.current)

    def restore(self, checkpoint: RoundCheckpoint) -> None:
        """Take over the ledger of a checkpoint (its partial is merged by the caller)."""
        self.accepted = list(checkpoint.accepted)
        self.aside = list(checkpoint.aside)
        self.aside_devices = set(checkpoint.aside_devices)
        self.counted = set(checkpoint.accepted).union(checkpoint.aside)
        self.accepted_devices = set(checkpoint.accepted_devices)
        self.rejected.clear()
        self.rejected.update(checkpoint.rejected)
        self.reporters = set(checkpoint.reporters)
        self.examples = checkpoint.examples
        self.loss_sum = checkpoint.loss_sum
        self.checkpoints = checkpoint.sequence + 1
        self.joined = True
