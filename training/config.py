"""``TrainConfig``: every setting of ``dfosd-train``, typed, validated once, loadable from a file.

Sources, later ones win: the dataclass defaults, a ``--config FILE`` (TOML, or YAML when PyYAML
is installed), then the command-line flags that were actually given. Keys in the file are the
flag names with ``-`` or ``_`` (``batch_size`` = ``batch-size``); an unknown key is an error
naming the file and the key, so a typo never silently trains with a default. Paths in the file
are taken relative to the current directory, exactly as on the command line.

This module imports no torch: ``dfosd-train --help`` and config errors stay instant.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from dfosd.core.errors import DfosdError, problems_error

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"  # = dfosd.core.bases.DEFAULT_BASE (that module is heavier)
PERCEPTUAL_CHOICES = ("dists", "none")
MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
MAX_EMBEDDING_TOKENS = 77  # = dfosd.core.checkpoint.MAX_TOKENS
CHECKPOINT_SUFFIX = ".safetensors"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the full-size recipe (paper: batch 16, 512 crops, lr 5e-5, r16)."""

    base: str = DEFAULT_BASE
    data: str | None = None  # folder of HR images (required)
    out: str | None = None  # the lora.safetensors to write (required unless dump_pairs)
    steps: int = 100_000  # optimizer updates
    batch_size: int = 16  # images per optimizer update, over all processes and accumulation micro-steps
    grad_accum: int = 1  # micro-steps per update (the micro-batch is batch_size / grad_accum / processes)
    lr: float = 5e-5  # AdamW, generator and discriminator
    lr_warmup: int = 0  # linear warm-up steps (0: constant lr, as in the paper)
    rank: int = 16  # LoRA rank of the generator UNet and of the discriminator trunk
    alpha: float = 16.0  # LoRA alpha (scale = alpha / rank)
    timestep: int = 999  # the fixed one-step timestep T
    embedding_tokens: int = 77  # N of the learned embedding [1, N, cross_attention_dim]
    lambda_adv: float = 0.1  # weight of the non-saturating G loss from the noise-aware discriminator
    lambda_eadists: float = 1.0  # weight of EA-DISTS
    perceptual: str = "dists"  # "dists" (EA-DISTS, needs weights) or "none"
    perceptual_weights: str | None = None  # explicit DISTS weights file
    seed: int = 0
    resume: str | None = None  # a training-state file, or a folder holding them (the newest is used)
    crop: int = 512  # HR crop size (LR = crop / 4)
    save_every: int = 1000  # training-state interval in steps (0: only at the end)
    keep_states: int = 2  # newest training states kept on disk
    sample_every: int = 1000  # sample SR image interval in steps (0: never)
    log_dir: str | None = None  # states, CSV log, samples; default: <out without suffix>-train/
    dump_pairs: tuple[int, str] | None = None  # (N, DIR): write N LR/HR pairs and stop
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under `accelerate launch`: each process's own GPU)
    mixed_precision: str = "auto"  # autocast on CUDA only: auto (bf16 if supported, else fp16) | no | bf16 | fp16
    gradient_checkpointing: bool = False  # UNet and VAE decoder: less memory, ~30 % more compute
    num_workers: int | None = None  # DataLoader workers; None: 0 on CPU, 4 on CUDA
    progress: bool = True  # tqdm bar (main process only)

    def __post_init__(self):
        problems, bad = _type_problems(self)
        # range checks on the well-typed fields too, so one error lists everything
        checkable = types.SimpleNamespace(**{f.name: f.default if f.name in bad else getattr(self, f.name)
                                             for f in dataclasses.fields(self)})
        problems += [m for m in _value_problems(checkable) if m.split(" ", 1)[0] not in bad]
        if problems:
            raise problems_error("invalid training configuration", problems,
                                 hint="see `dfosd-train --help` and training/README.md")

    # ------------------------------------------------------------ derived

    @property
    def log_path(self) -> Path:
        if self.log_dir is not None:
            return Path(self.log_dir)
        out = Path(self.out or "dfosd-train")
        return out.with_name(out.stem + "-train")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["dump_pairs"] is not None:
            d["dump_pairs"] = list(d["dump_pairs"])
        return d

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


#: settings a resumed run must share with the saved one, or it would not continue the same run
RESUME_MUST_MATCH = ("base", "batch_size", "grad_accum", "lr", "lr_warmup", "rank", "alpha", "timestep",
                     "embedding_tokens", "lambda_adv", "lambda_eadists", "perceptual", "seed", "crop")

FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


# ---------------------------------------------------------------- validation


def _type_problems(cfg: TrainConfig) -> tuple[list[str], set[str]]:
    """Type errors, and the names of the fields that have them; well-typed values are normalised."""
    hints = typing.get_type_hints(TrainConfig)
    problems, bad = [], set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        ok, coerced = _coerce(value, hints[f.name])
        if ok:
            object.__setattr__(cfg, f.name, coerced)  # e.g. an int lr from TOML becomes a float
        else:
            problems.append(f"{f.name} = {value!r}: expected {_type_name(hints[f.name])}")
            bad.add(f.name)
    return problems, bad


def _coerce(value, tp) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if type(None) in args:  # X | None
        if value is None:
            return True, None
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        if isinstance(value, Path):
            return True, str(value)
        return isinstance(value, str), value
    if typing.get_origin(tp) is tuple:  # dump_pairs: (int, str)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            ok_n, n = _coerce(value[0], int)
            ok_p, p = _coerce(value[1], str)
            if ok_n and ok_p:
                return True, (n, p)
        return False, value
    raise TypeError(f"TrainConfig field type {tp} has no check")  # a bug here, not a user error


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if type(None) in args:
        return _type_name([a for a in args if a is not type(None)][0]) + " or nothing"
    if typing.get_origin(tp) is tuple:
        return "[N, DIR] (an integer and a folder)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _value_problems(c) -> list[str]:
    p: list[str] = []
    if c.data is None:
        p.append("data is required (--data DIR: a folder of HR images)")
    if c.dump_pairs is None:
        if c.out is None:
            p.append("out is required (--out lora.safetensors)")
        elif not c.out.endswith(CHECKPOINT_SUFFIX):
            p.append(f"out {c.out!r} must end with {CHECKPOINT_SUFFIX} (the checkpoint format is safetensors)")
    elif c.dump_pairs[0] < 1:
        p.append(f"dump_pairs N = {c.dump_pairs[0]} must be >= 1")
    for name in ("steps", "batch_size", "grad_accum", "rank", "embedding_tokens", "keep_states"):
        if getattr(c, name) < 1:
            p.append(f"{name} = {getattr(c, name)} must be >= 1")
    for name in ("lr_warmup", "save_every", "sample_every", "seed"):
        if getattr(c, name) < 0:
            p.append(f"{name} = {getattr(c, name)} must be >= 0")
    if c.num_workers is not None and c.num_workers < 0:
        p.append(f"num_workers = {c.num_workers} must be >= 0")
    if c.grad_accum >= 1 and c.batch_size % c.grad_accum:
        p.append(f"batch_size {c.batch_size} is not divisible by grad_accum {c.grad_accum} "
                 "(batch_size is the whole batch of one update, split into grad_accum micro-batches)")
    if not (math.isfinite(c.lr) and c.lr > 0):
        p.append(f"lr = {c.lr} must be a positive number")
    if not (math.isfinite(c.alpha) and c.alpha > 0):
        p.append(f"alpha = {c.alpha} must be > 0")
    for name in ("lambda_adv", "lambda_eadists"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v >= 0):
            p.append(f"{name} = {v} must be a number >= 0")
    if not 0 <= c.timestep <= 999:
        p.append(f"timestep = {c.timestep} is outside [0, 999]")
    if c.embedding_tokens > MAX_EMBEDDING_TOKENS:
        p.append(f"embedding_tokens = {c.embedding_tokens} exceeds {MAX_EMBEDDING_TOKENS} (the checkpoint limit)")
    if c.perceptual not in PERCEPTUAL_CHOICES:
        p.append(f"perceptual = {c.perceptual!r}: choose one of {', '.join(PERCEPTUAL_CHOICES)}")
    elif c.perceptual == "none" and c.perceptual_weights is not None:
        p.append("perceptual_weights is only used with perceptual = dists (got perceptual = none)")
    if c.crop < 16 or c.crop % 4:
        p.append(f"crop = {c.crop} must be a multiple of 4 (the x4 scale) and >= 16")
    if not _DEVICE_RE.match(c.device):
        p.append(f"device = {c.device!r}: use auto, cpu, cuda or cuda:N")
    if c.mixed_precision not in MIXED_PRECISION_CHOICES:
        p.append(f"mixed_precision = {c.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION_CHOICES)}")
    elif c.mixed_precision in ("bf16", "fp16") and c.device == "cpu":
        p.append(f"mixed_precision = {c.mixed_precision} needs a CUDA device (autocast is used on GPU only); "
                 "use no or auto on CPU")
    return p


# ---------------------------------------------------------------- files


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML/YAML file, keys normalised to field names; unknown keys are an error."""
    path = Path(path)
    if not path.is_file():
        raise DfosdError(f"config file {path} does not exist", hint="pass --config FILE with a .toml or .yaml file")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise DfosdError(f"config file {path} is not valid TOML: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DfosdError(f"config file {path} is YAML, but PyYAML is not installed",
                             hint="pip install pyyaml, or write the config as TOML (same keys)") from None
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise DfosdError(f"config file {path} is not valid YAML: {exc}") from exc
        raw = {} if raw is None else raw
    else:
        raise DfosdError(f"config file {path} has suffix {path.suffix!r}", hint="use .toml, .yaml or .yml")
    if not isinstance(raw, Mapping):
        raise DfosdError(f"config file {path} must hold a table of settings (key = value), "
                         f"found {type(raw).__name__}")
    values, unknown = {}, []
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in FIELD_NAMES:
            values[name] = value
        else:
            unknown.append(str(key))
    if unknown:
        raise DfosdError(f"config file {path}: unknown key(s) {', '.join(repr(k) for k in unknown)}",
                         hint="known keys: " + ", ".join(FIELD_NAMES))
    return values


def build_config(flags: Mapping[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Defaults < config file < flags. ``flags`` holds only the options given (None = not given)."""
    values = read_config_file(config_file) if config_file is not None else {}
    unknown = [k for k in flags if k not in FIELD_NAMES]
    if unknown:
        raise TypeError(f"build_config got unknown settings {unknown}")  # a caller bug
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig(**values)
