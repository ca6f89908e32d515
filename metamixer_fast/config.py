"""Training configuration: one dataclass, read from TOML and overridden from the command line.

Every field carries its help text, so ``metamixer-fast train --help`` documents every option and
the config file accepts exactly the same names (with ``-`` or ``_``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metamixer import GLOBAL_PAIRINGS, LOCAL_PAIRINGS
from .models import MODELS, STAGE_NAMES
from .plan import INPUT_STAGE

METHODS = ("independent", "dml", "kdcl", "cutmix", "mixup", "metamixer")
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")
AMP_MODES = ("none", "bf16", "fp16")
SCHEDULES = ("cosine", "multistep")


def _opt(default: Any, help: str, **extra: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # what to train
    method: str = _opt("metamixer", f"training method: {', '.join(METHODS)} (cutmix/mixup/metamixer "
                                     "use DML between the peers; kdcl distills to the peer ensemble)")
    arch: list[str] = _opt(["resnet20"], "peer architectures, comma separated; one name is repeated "
                                        "for every peer; a name or package.module:factory")
    peers: int = _opt(2, "number of peer networks K (>= 2; ignored when arch lists several)")
    dataset: str = _opt("fashion-mnist", f"dataset: {', '.join(DATASETS)}")
    data_dir: str = _opt("", "directory with the dataset files (default: the dataset's usual place)")
    synthetic_size: int = _opt(2048, "number of training images of the synthetic dataset")
    # optimisation
    epochs: int = _opt(10, "number of training epochs")
    batch_size: int = _opt(128, "images per step (per process under torchrun)")
    lr: float = _opt(0.1, "peak learning rate of SGD")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(True, "use Nesterov momentum")
    weight_decay: float = _opt(5e-4, "L2 weight decay")
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up: cosine or multistep")
    # Without a warm-up, DML at lr 0.1 with T = 3 sent ResNet-20 peers on Fashion-MNIST to
    # chance accuracy in the first steps (and they stayed there); one epoch of warm-up trains.
    warmup_epochs: float = _opt(1.0, "linear learning-rate warm-up length in epochs (at most "
                                     "'epochs')")
    milestones: list[float] = _opt([0.5, 0.75], "multistep: fractions of training where lr *= gamma")
    gamma: float = _opt(0.1, "multistep: learning-rate decay factor")
    # distillation
    temperature: float = _opt(3.0, "distillation temperature T")
    kd_weight: float = _opt(1.0, "weight of the distillation term (0 for independent)")
    kd_ramp_epochs: float = _opt(0.0, "ramp the distillation weight linearly from 0 over this many epochs")
    label_smoothing: float = _opt(0.0, "label smoothing eps of the cross-entropy term")
    # mixing
    mix_prob: float = _opt(1.0, "probability that a step is mixed (cutmix, mixup, metamixer)")
    local_alpha: float = _opt(1.0, "metamixer: Beta(a, a) of the local (CutMix-like) mixing")
    global_alpha: float = _opt(1.0, "metamixer: Beta(a, a) of the global (Mixup-like) blend")
    stages: list[str] = _opt(["input", "stage1", "stage2", "stage3"],
                             "metamixer: where the global blend may happen, one drawn per step")
    local_pairing: str = _opt("same_class", "metamixer: local partner rule, same_class or random")
    global_pairing: str = _opt("other_class", "metamixer: global partner rule, other_class or random")
    cutmix_alpha: float = _opt(1.0, "cutmix: Beta(a, a) of the box area")
    mixup_alpha: float = _opt(0.2, "mixup: Beta(a, a) of the blend weight")
    # hardware
    device: str = _opt("auto", "auto, cpu or cuda")
    amp: str = _opt("none", "automatic mixed precision: none, bf16 or fp16 (fp16 uses a GradScaler)")
    channels_last: bool = _opt(True, "store images and activations channels_last")
    compile: bool = _opt(False, "torch.compile the peers' forward (helps on GPU; measure on CPU)")
    threads: int = _opt(0, "CPU threads for torch (0: leave torch's default)")
    retain_memory: bool = _opt(True, "CPU: keep freed memory in the process between steps instead "
                                     "of returning it to the OS (saves page faults; glibc only)")
    # bookkeeping
    seed: int = _opt(0, "random seed (model init, data order, mixing)")
    deterministic: bool = _opt(False, "use deterministic algorithms only")
    out: str = _opt("runs/latest", "run directory: config, metrics.jsonl, checkpoint.pt, plots")
    eval_batch_size: int = _opt(512, "images per evaluation step")
    limit_train_batches: int = _opt(0, "stop each epoch after this many steps (0: the whole epoch)")
    limit_eval_batches: int = _opt(0, "evaluate on this many batches only (0: the whole test set)")
    progress: bool = _opt(True, "show a progress bar (the running training loss, the peers' "
                                "training top-1 against each sample's own label, on mixed images "
                                "when mixing, and images/s)")
    stop_after_epochs: int = _opt(0, "end this invocation after this many epochs, checkpoint "
                                     "written (continue with --resume; 0: run to the end)")

    def validate(self) -> TrainConfig:
        types = _field_types()
        for name in (f.name for f in dataclasses.fields(self) if types[f.name] is float):
            # inf/NaN pass the range checks below (or break them), and would train on nonsense
            _check(math.isfinite(getattr(self, name)), name, "a finite number", getattr(self, name))
        _check(self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method)
        _check(self.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}", self.dataset)
        _check(self.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}", self.amp)
        _check(self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        _check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        _check(len(self.arch) >= 1 and all(self.arch), "arch", "at least one architecture name", self.arch)
        _check(len(self.arch) > 1 or self.peers >= 2, "peers", "an integer >= 2", self.peers)
        for name in ("epochs", "batch_size", "eval_batch_size", "synthetic_size"):
            _check(getattr(self, name) >= 1, name, "an integer >= 1", getattr(self, name))
        for name in ("lr", "temperature", "gamma"):
            _check(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))
        for name in ("momentum", "mix_prob", "label_smoothing"):
            _check(0 <= getattr(self, name) <= 1, name, "a number in [0, 1]", getattr(self, name))
        for name in ("weight_decay", "kd_weight", "warmup_epochs", "kd_ramp_epochs",
                     "limit_train_batches", "limit_eval_batches", "threads", "stop_after_epochs"):
            _check(getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))
        for name in ("local_alpha", "global_alpha", "cutmix_alpha", "mixup_alpha"):
            _check(getattr(self, name) > 0, name, "a number > 0", getattr(self, name))
        _check(self.warmup_epochs <= self.epochs, "warmup_epochs",
               f"at most 'epochs' ({self.epochs}): the learning rate would never reach its peak",
               self.warmup_epochs)
        _check(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        _check(self.out.strip() != "", "out", "a directory path", self.out)
        _check(not (self.dataset == "synthetic" and self.data_dir), "data_dir",
               "empty with dataset 'synthetic' (which is generated, not read)", self.data_dir)
        _check(all(0 < m < 1 for m in self.milestones), "milestones",
               "fractions of training in (0, 1)", self.milestones)
        for name, choices in (("local_pairing", LOCAL_PAIRINGS), ("global_pairing", GLOBAL_PAIRINGS)):
            _check(getattr(self, name) in choices, name, f"one of {', '.join(choices)}", getattr(self, name))
        self._validate_stages()
        return self

    def _validate_stages(self) -> None:
        _check(len(self.stages) >= 1, "stages", "at least one stage name", self.stages)
        if self.method != "metamixer":
            return  # only MetaMixer blends at a stage
        # The built-in models all name their stages STAGE_NAMES, so a typo is found here rather
        # than at the first step that draws it (a custom factory's peers are checked by the Run).
        known = (INPUT_STAGE, *STAGE_NAMES)
        if all(a.lower() in MODELS for a in self.arch):
            _check(set(self.stages) <= set(known), "stages", f"names among {', '.join(known)}", self.stages)
        # A compiled graph does not see the forward hooks that mix inside a peer.
        _check(not (self.compile and set(self.stages) != {INPUT_STAGE}),
               "stages", "['input'] when 'compile' is on (hooks inside compiled peers do not run)",
               self.stages)

    @property
    def peer_archs(self) -> list[str]:
        return list(self.arch) if len(self.arch) > 1 else list(self.arch) * self.peers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A bad configuration value, config file or command-line override."""


def _check(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"config '{name}' must be {expected}; got {got!r}")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Turn a TOML or command-line value into the field's type, with a clear error."""
    try:
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            if not isinstance(value, (str, list, tuple)):  # a TOML table would give its keys
                raise ValueError(value)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_number(v.strip() if isinstance(v, str) else v, item) for v in items if v != ""]
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        return _number(value, kind)
    except (TypeError, ValueError):
        raise ConfigError(f"config '{name}' must be {_expected(kind)}; got {value!r}") from None


def _expected(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        items = {int: "integers", float: "numbers"}.get(item, "strings")
        return f"a list (or comma-separated string) of {items}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]


def _number(value: Any, kind: Any) -> Any:
    """``value`` as an int, float or str field; a bool is not a number here (TOML's ``true``
    would otherwise train for 1 epoch), nor a fractional float an int."""
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if kind is str and not isinstance(value, str):
        raise ValueError(value)
    return kind(value)


def from_mapping(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from ``base`` (defaults if None) with ``values`` applied; unknown keys are errors."""
    types = _field_types()
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types:
            raise ConfigError(f"unknown config option '{key}'; known options: {', '.join(types)}")
        setattr(cfg, name, _coerce(name, value, types[name]))
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # not "does not exist": it does, as the wrong thing
        raise ConfigError(f"config file {path} is a directory; pass a TOML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    if "train" not in data:
        return dict(data)  # top-level keys (unknown ones are refused by from_mapping)
    # With a [train] table only its keys are read: anything beside it would be dropped unseen.
    outside = sorted(key for key in data if key != "train")
    if outside:
        raise ConfigError(f"config file {path}: {', '.join(map(repr, outside))} outside the [train] "
                          f"table would be ignored; move them into [train] (or drop the table header)")
    if not isinstance(data["train"], dict):
        raise ConfigError(f"config file {path}: 'train' must be a table ([train]), got "
                          f"{type(data['train']).__name__}")
    return dict(data["train"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per config field, each defaulting to 'not given' so that the config file
    stays in charge of everything the command line does not override."""
    parser.add_argument("--config", help="TOML file with any of the options below "
                                         "(top level or under [train]); flags override it")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f.metadata["help"] + (f" (default: {shown})" if shown != "" else "")
        if _field_types()[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(args: argparse.Namespace) -> TrainConfig:
    values = load_toml(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    return from_mapping({**values, **overrides}).validate()
