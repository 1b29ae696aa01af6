"""Experiment configs: parsed once, validated with clear errors, frozen afterwards."""

from __future__ import annotations

import inspect
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggregator_service.errors import ConfigError
from aggregator_service.strategies import STRATEGIES, FedAvg, Strategy
from aggregator_service.types import RunShape
from broker.messages import MaskedSumTerms, StrategySpec
from broker.secagg import SecAggError, scale_for
from device_sdk.data import DATASET_FACTS, DATASETS, PARTITIONS
from model_store import ModelSpec, ModelSpecError
from model_store.export.executorch import DEFAULT_MAX_BATCH

OPTIMIZERS = ("sgd", "adam")
PLATFORMS = ("python", "android", "ios")
MAX_DEADLINE_S = 7 * 86_400.0
"""The longest ``rounds.deadline_s``: a week. Longer is a typo, and near 1e308 the
deadline's timestamp overflows (simulate stopped with "timestamp out of range")."""


@dataclass(frozen=True)
class DataConfig:
    """Which data set the emulated devices hold and how it is split among them."""

    dataset: str = "digits"
    devices: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_device: int = 2


@dataclass(frozen=True)
class RoundsConfig:
    """How many rounds, how many devices each, and when a round may close."""

    count: int = 10
    devices_per_round: int = 10
    over_selection: float = 1.3
    min_reports: int = 0
    deadline_s: float = 60.0

    @property
    def selection_size(self) -> int:
        """Return how many devices a round invites (target times over-selection)."""
        return math.ceil(self.devices_per_round * self.over_selection)

    @property
    def minimum(self) -> int:
        """Return the reports needed to commit at the deadline (default: the target)."""
        return self.min_reports or self.devices_per_round


@dataclass(frozen=True)
class TrainingConfig:
    """Local training settings sent to every device in its task."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Secure aggregation (SecAgg+): workers sum masked updates and never see one in the clear.

    ``clip`` bounds each value of a device's delta, ``max_examples`` the
    weight one update may carry; together with the cohort size they fix the
    fixed-point scale, so the sum of every update fits 32 bits. Each device
    shares its secrets with ``neighbours`` others, and a secret comes back
    from ``threshold`` of its neighbourhood's shares (a fraction above one
    half). ``neighbours`` 0 picks the fewest that let the round unmask, with
    a chance of failure below one in a million, when up to ``dropout`` of the
    cohort vanishes mid-protocol (every other device when the cohort is small).
    Each key stage waits at most ``stage_timeout_s`` for late devices.
    """

    clip: float = 1.0
    max_examples: int = 10_000
    neighbours: int = 0
    threshold: float = 0.55
    dropout: float = 0.2
    stage_timeout_s: float = 30.0


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: model, data, strategy, rounds and training settings."""

    name: str
    model: Mapping[str, Any]
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    secure_aggregation: SecureAggregationConfig | None = None
    """Present: every round runs secure aggregation (see ``SecureAggregationConfig``)."""

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ExperimentConfig:
        """Parse and validate a config mapping; raise ``ConfigError`` naming the bad field."""
        if not isinstance(raw, Mapping):
            raise ConfigError("an experiment config must be a JSON object")
        unknown = set(raw) - {*_SECTIONS, "secure_aggregation"}
        if unknown:
            raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
        if not isinstance(raw.get("model"), Mapping):
            raise ConfigError("model: required, an object such as {'zoo': 'mlp', ...}")
        data = _section(DataConfig, raw.get("data", {}), "data")
        rounds = _section(RoundsConfig, raw.get("rounds", {}), "rounds")
        training = _section(TrainingConfig, raw.get("training", {}), "training")
        secure = raw.get("secure_aggregation")
        secagg = None
        if secure is not None:
            secagg = _section(SecureAggregationConfig, secure, "secure_aggregation")
        run = RunShape(data.devices, rounds.devices_per_round, training.lr)
        strategy = strategy_spec(_typed(raw, "strategy", Mapping, {}), run, secagg)
        config = cls(
            name=_typed(raw, "name", str, "experiment"),
            seed=_typed(raw, "seed", int, 0),
            model=dict(raw["model"]),
            data=data,
            strategy=strategy,
            rounds=rounds,
            training=training,
            secure_aggregation=secagg,
        )
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ConfigError`` listing every value no run could use, not just the first."""
        r, t, d = self.rounds, self.training, self.data
        checks = [
            (bool(self.name.strip()), "name: must not be empty"),
            # torch seeds take 64 bits; a device runtime's int64 takes 63.
            (0 <= self.seed < 2**63, "seed: must be an integer from 0 to 2**63 - 1"),
            (r.count >= 1, "rounds.count: must be at least 1"),
            (r.devices_per_round >= 1, "rounds.devices_per_round: must be at least 1"),
            (r.over_selection >= 1.0, "rounds.over_selection: must be at least 1.0"),
            (r.over_selection <= 10.0, "rounds.over_selection: at most 10"),
            (
                0 <= r.min_reports <= r.devices_per_round,
                "rounds.min_reports: must be between 0 and devices_per_round",
            ),
            (r.deadline_s > 0, "rounds.deadline_s: must be positive"),
            (
                not r.deadline_s > MAX_DEADLINE_S,  # nan is refused by the check above
                f"rounds.deadline_s: at most {MAX_DEADLINE_S:g} (a week)",
            ),
            (t.epochs >= 1, "training.epochs: must be at least 1"),
            (t.batch_size >= 1, "training.batch_size: must be at least 1"),
            (t.optimizer in OPTIMIZERS, f"training.optimizer: one of {OPTIMIZERS}"),
            (t.lr > 0, "training.lr: must be positive"),
            # torch's optimizers refuse negative values in every device's every round.
            (0 <= t.momentum < math.inf, "training.momentum: a finite number, 0 or more"),
            (0 <= t.weight_decay < math.inf, "training.weight_decay: a finite number, 0 or more"),
            (d.devices >= 1, "data.devices: must be at least 1"),
            (d.dataset in DATASETS, f"data.dataset: one of {DATASETS}"),
            (d.partition in PARTITIONS, f"data.partition: one of {PARTITIONS}"),
            (d.alpha > 0, "data.alpha: must be positive"),
            (
                d.partition != "shards" or d.shards_per_device >= 1,
                "data.shards_per_device: must be at least 1 with partition shards",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        checks_that_raise = (
            lambda: build_strategy(self.strategy),
            self.platforms,
            self._fits_data,
            self._phones_can_train,
            self._secure_aggregation_fits,
            self._strategy_fits_rounds,
        )
        for check in checks_that_raise:
            try:
                check()
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError("; ".join(problems), problems)

    def _fits_data(self) -> None:
        """Raise ``ConfigError`` if the model cannot take the data set or the fleet cannot run."""
        spec = self.model_spec()
        d, r = self.data, self.rounds
        facts = DATASET_FACTS.get(d.dataset)
        if facts is None:
            return  # an unknown data set is reported by ``validate``
        problems = []
        # Every zoo model but the CNN flattens its input: the sizes must agree; the
        # CNN needs the very (channels, height, width).
        flat = math.prod(spec.input_shape) == math.prod(facts.input_shape)
        exact = spec.input_shape == facts.input_shape
        if not flat or (spec.zoo == "mnist_cnn" and not exact):
            problems.append(
                f"model.input_shape: {list(spec.input_shape)} does not fit {d.dataset}, "
                f"whose examples have shape {list(facts.input_shape)}"
            )
        if spec.num_classes < facts.num_classes:
            problems.append(
                f"model.num_classes: {spec.num_classes}, but {d.dataset} has "
                f"{facts.num_classes} classes"
            )
        parts = d.devices * (d.shards_per_device if d.partition == "shards" else 1)
        if parts > facts.train_examples:
            problems.append(
                f"data.devices: {d.devices} devices ({parts} parts) cannot split the "
                f"{facts.train_examples} training examples of {d.dataset}"
            )
        if r.devices_per_round > d.devices:
            problems.append(
                f"rounds.devices_per_round: {r.devices_per_round}, but data.devices "
                f"emulates only {d.devices}: no round could start"
            )
        if problems:
            raise ConfigError("; ".join(problems), problems)

    def _strategy_fits_rounds(self) -> None:
        """Raise ``ConfigError`` for a strategy that cannot step from a round's fewest reports.

        A round may commit with ``rounds.minimum`` updates; a strategy that needs
        more (``Strategy.fewest_updates``: Krum's ``2f + 3``) would fail every such
        round at its combine.
        """
        try:
            strategy = build_strategy(self.strategy)
        except ConfigError:
            return  # reported by validate's own build
        needs, fewest = strategy.fewest_updates(), self.rounds.minimum
        if fewest >= needs:
            return
        given = ", ".join(f"{k} {v}" for k, v in self.strategy.settings.items())
        raise ConfigError(
            f"strategy {self.strategy.name} ({given or 'its defaults'}) needs at least {needs} "
            f"updates a round, but a round may commit with {fewest} (rounds.min_reports, else "
            "devices_per_round)"
        )

    def _phones_can_train(self) -> None:
        """Raise ``ConfigError`` for settings every phone would refuse, round after round.

        Phones train an exported ExecuTorch program with the runtime's SGD: no
        other optimizer, and batches of at most the programs' largest (the
        service exports them for ``PHONE_MAX_BATCH``).
        """
        try:
            platforms = self.platforms()
        except ConfigError:
            return  # validate reports model.platforms itself; once is enough
        phones = [p for p in platforms if p in PHONE_PLATFORMS]
        if not phones:
            return
        t = self.training
        problems = []
        if t.optimizer != "sgd":
            problems.append(f"training.optimizer: phones ({phones}) train with sgd only")
        if t.batch_size > PHONE_MAX_BATCH:
            problems.append(
                f"training.batch_size: {t.batch_size}, but the phones' programs take "
                f"batches of at most {PHONE_MAX_BATCH}"
            )
        if problems:
            raise ConfigError("; ".join(problems), problems)

    def _secure_aggregation_fits(self) -> None:
        """Raise ``ConfigError`` for secure aggregation settings or a strategy it cannot serve."""
        secure = self.secure_aggregation
        if secure is None:
            return
        try:
            cohort = self.rounds.selection_size
        except OverflowError:  # rounds settings out of range: validate's own checks say so
            return
        problems = [
            message
            for ok, message in (
                (secure.clip > 0, "secure_aggregation.clip: must be positive"),
                (secure.max_examples >= 1, "secure_aggregation.max_examples: at least 1"),
                (secure.neighbours >= 0, "secure_aggregation.neighbours: 0 or more"),
                (
                    0.5 < secure.threshold <= 1.0,
                    "secure_aggregation.threshold: above 0.5 and at most 1",
                ),
                (
                    0 <= secure.dropout < 1 - secure.threshold,
                    "secure_aggregation.dropout: at least 0 and below 1 - threshold "
                    "(a neighbourhood must keep a threshold's worth of devices)",
                ),
                (secure.stage_timeout_s > 0, "secure_aggregation.stage_timeout_s: positive"),
                (
                    cohort >= 3,
                    "secure_aggregation: needs a cohort of at least 3 devices "
                    "(rounds.devices_per_round x over_selection)",
                ),
            )
            if not ok
        ]
        if not problems and not _fits_32_bits(secure, cohort):
            problems.append(
                f"secure_aggregation: clip x max_examples x the cohort "
                f"({secure.clip:g} x {secure.max_examples} x {cohort}) "
                "leaves no precision in 32-bit sums; lower clip or max_examples"
            )
        # A strategy it cannot serve is refused where the strategy is built.
        if problems:
            raise ConfigError("; ".join(problems), problems)

    def model_spec(self) -> ModelSpec:
        """Return the zoo model the config names; raise ``ConfigError`` if it cannot exist."""
        try:
            return ModelSpec.from_config({k: v for k, v in self.model.items() if k != "platforms"})
        except ModelSpecError as exc:
            raise ConfigError(f"model: {exc}") from exc

    def platforms(self) -> tuple[str, ...]:
        """Return the device platforms the model is packaged for (``model.platforms``).

        Python devices are always served (they train the TorchScript artifact);
        ``android`` and ``ios`` add those packages to the model's version 0.
        """
        raw = self.model.get("platforms", ["python"])
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ConfigError(f"model.platforms: a list of names from {PLATFORMS}")
        unknown = sorted(set(raw) - set(PLATFORMS))
        if unknown:
            raise ConfigError(f"model.platforms: unknown {unknown}; known: {list(PLATFORMS)}")
        return tuple(p for p in PLATFORMS if p in raw or p == "python")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON-able data, as ``from_dict`` reads it."""
        raw: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        # The strategy section is flat; its secure aggregation terms follow from that section.
        raw["strategy"] = {"name": self.strategy.name, **self.strategy.settings}
        return raw

    @property
    def buffered(self) -> bool:
        """Whether rounds are buffered server steps (``Strategy.buffered``: FedBuff's).

        Such an experiment keeps devices training continuously on whatever model
        version is current; each of its rounds is one server step that folds
        ``buffer_size`` updates, stale ones included, into the next version.
        """
        cls = strategy_classes().get(self.strategy.name)
        return cls is not None and cls.buffered

    def training_settings(self) -> dict[str, float | int | str | bool]:
        """Return the training settings as sent in a task."""
        return {k: v for k, v in asdict(self.training).items()}


_SECTIONS = ("name", "seed", "model", "data", "strategy", "rounds", "training")

PHONE_PLATFORMS = ("android", "ios")
#: The largest batch of the phone programs a service exports (``--max-batch``'s default).
PHONE_MAX_BATCH = DEFAULT_MAX_BATCH


def _fits_32_bits(secure: SecureAggregationConfig, cohort: int) -> bool:
    """Return whether a cohort claiming the most examples still leaves a usable scale."""
    try:
        scale_for(secure.clip, secure.max_examples * cohort)
    except (SecAggError, OverflowError):  # OverflowError: a weight past any float
        return False
    return True


def strategy_classes() -> dict[str, type[Strategy]]:
    """Return every strategy a config may name, DP included."""
    from aggregator_service.privacy import DPFedAvg

    return {**STRATEGIES, DPFedAvg.name: DPFedAvg}


def secure_strategies() -> list[str]:
    """Return the strategies secure aggregation serves (see ``Strategy.secure_refusal``)."""
    return [name for name, cls in strategy_classes().items() if cls.secure_refusal is None]


def strategy_spec(
    section: Mapping[str, Any], run: RunShape, secure: SecureAggregationConfig | None = None
) -> StrategySpec:
    """Parse a config's ``strategy`` section into a spec the workers build from.

    Settings that follow from the rest of the config (``Strategy.derived_settings``)
    are added where the section leaves them out; a setting the user gave is kept.
    With secure aggregation the spec says that updates come masked, clipped to
    what and weighted up to what.
    """
    given = dict(section)
    name = given.pop("name", StrategySpec.name)
    if not isinstance(name, str):
        raise ConfigError(f"strategy.name: expected a name, got {name!r}")
    if secure is not None:
        # Configs FedMQ stored before the spec was typed repeat the terms here.
        given.pop("secure_aggregation", None)
    for key, value in given.items():
        if value is not None and not isinstance(value, bool | int | float | str):
            raise ConfigError(
                f"strategy.{key}: expected a number, true/false or text, got {value!r}"
            )
    cls = strategy_classes().get(name)
    derived = {} if cls is None else cls.derived_settings(given, run)
    masked = None
    if secure is not None:
        masked = MaskedSumTerms(clip=secure.clip, max_examples=secure.max_examples)
    return StrategySpec(name=name, settings={**derived, **given}, masked=masked)


def build_strategy(spec: StrategySpec) -> Strategy:
    """Return the strategy ``spec`` names, with its settings.

    With ``spec.masked``, the strategy sums masked updates and steps as the
    named one from their unmasked sum.
    """
    known = strategy_classes()
    cls = known.get(spec.name)
    if cls is None:
        raise ConfigError(
            f"strategy.name: unknown {spec.name!r}; known: {', '.join(sorted(known))}"
        )
    problem = _settings_problem(cls, spec.settings)
    if problem is not None:
        raise ConfigError(f"strategy {spec.name}: {problem}")
    try:
        strategy = cls(**spec.settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {spec.name}: {exc}") from exc
    if spec.masked is None:
        return strategy
    if cls.secure_refusal is not None or not isinstance(strategy, FedAvg):  # (2nd: the type)
        why = cls.secure_refusal or "is not one it serves"
        raise ConfigError(
            f"secure_aggregation: strategy {spec.name} {why}; "
            f"it serves {', '.join(secure_strategies())}"
        )
    from aggregator_service.secagg.strategy import SecureSum

    try:
        return SecureSum(strategy, clip=spec.masked.clip, max_examples=spec.masked.max_examples)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {spec.name}: secure_aggregation {exc}") from exc


def _settings_problem(cls: type, settings: Mapping[str, Any]) -> str | None:
    """Say which settings a strategy does not take or lacks (None: the names fit)."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    takes = sorted(parameters)
    unknown = sorted(set(settings) - set(parameters))
    if unknown:
        return f"unknown setting(s) {', '.join(unknown)}; it takes {', '.join(takes) or 'none'}"
    missing = sorted(
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and name not in settings
    )
    return f"missing setting(s) {', '.join(missing)}" if missing else None


MAX_MODEL_PARAMETERS = 1 << 28
"""Default largest model a service builds: 1 GiB of float32 weights, the default upload limit.

A larger model is refused before anything is allocated: building it would
fail inside torch or take the host's memory.
"""


def check_model_size(config: ExperimentConfig, limit: int | None = None) -> None:
    """Raise ``ConfigError`` for a model with more weights than ``limit`` (default above)."""
    check_spec_size(config.model_spec(), limit)


def check_spec_size(spec: ModelSpec, limit: int | None = None) -> None:
    """Raise ``ConfigError`` for a zoo model with more weights than ``limit`` (default above)."""
    limit = limit or MAX_MODEL_PARAMETERS
    size = spec.parameter_count()
    if size > limit:
        # Named as the operator sets it: the Flask key is read from this variable.
        raise ConfigError(
            f"model: {size} parameters, above this service's limit of {limit} "
            "(FEDMQ_MAX_MODEL_PARAMETERS)"
        )


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment config from a ``.json`` or ``.toml`` file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    # T.TOML is TOML too: suffixes compare as the file systems that ignore case see them.
    kind = "TOML" if p.suffix.lower() == ".toml" else "JSON"
    try:
        raw = tomllib.loads(text.decode()) if kind == "TOML" else json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid {kind}: {exc}") from exc
    except RecursionError:  # thousands of nested lists: the parsers recurse per level
        raise ConfigError(f"{p} is not valid {kind}: nested too deeply") from None
    return ExperimentConfig.from_dict(raw)


def _typed(raw: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """Return ``raw[key]`` if it has type ``kind`` (default when absent), else raise."""
    value = raw.get(key, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _section(cls: type[Any], raw: Any, where: str) -> Any:
    """Build a config section dataclass from a mapping, type-checking each field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an object")
    defaults = cls()
    known = {f for f in asdict(defaults)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    values = {}
    for name in known:
        default = getattr(defaults, name)
        value = raw.get(name, default)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
        values[name] = value
    return cls(**values)
