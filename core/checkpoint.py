"""The DFOSD checkpoint: ``lora.safetensors`` (spec in README.md, "Checkpoint format").

Tensors
- ``unet.<module>.lora_A.weight`` / ``unet.<module>.lora_B.weight``: PEFT LoRA factors, the
  names diffusers writes and reads. Linear: A [r, in], B [out, r]. Conv2d: A [r, in, kh, kw],
  B [out, r, 1, 1].
- ``text_embedding``: float [1, N, cross_attention_dim], N <= 77.
Metadata (safetensors header, all strings): dfosd_format "1", base_model, timestep,
lora_rank, lora_alpha (scale = alpha / rank), upscale, vae_latent "mean".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from dfosd.core.atomic import atomic_target
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.manifest import sha256_file

if TYPE_CHECKING:
    import torch

    from dfosd.core.bases import Base

FORMAT_VERSION = "1"
UNET_PREFIX = "unet."
EMBEDDING_KEY = "text_embedding"
MAX_TOKENS = 77
REQUIRED_METADATA = ("dfosd_format", "base_model", "timestep", "lora_rank", "lora_alpha", "upscale", "vae_latent")
# What DFOSD trains: attention projections, feed-forward and ResNet convs of the UNet.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


@dataclass(frozen=True)
class CheckpointMetadata:
    base_model: str
    timestep: int = 999
    lora_rank: int = 16
    lora_alpha: float = 16.0
    upscale: int = 4
    vae_latent: str = "mean"
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        problems = []
        if not 0 <= self.timestep <= 999:
            problems.append(f"timestep {self.timestep} is outside [0, 999]")
        if self.lora_rank < 1:
            problems.append(f"lora_rank {self.lora_rank} must be >= 1")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:  # nan passes "<= 0"
            problems.append(f"lora_alpha {self.lora_alpha} must be a finite number > 0")
        if self.upscale < 1:
            problems.append(f"upscale {self.upscale} must be >= 1")
        if self.vae_latent != "mean":
            problems.append(f"vae_latent {self.vae_latent!r} is not supported (only 'mean')")
        if problems:
            raise problems_error("invalid checkpoint metadata", problems)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_strings(self) -> dict[str, str]:
        out = dict(self.extra)
        out.update(dfosd_format=FORMAT_VERSION, base_model=self.base_model, timestep=str(self.timestep),
                   lora_rank=str(self.lora_rank), lora_alpha=_fmt_number(self.lora_alpha),
                   upscale=str(self.upscale), vae_latent=self.vae_latent)
        return out


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class DfosdCheckpoint:
    lora: Mapping[str, "torch.Tensor"]  # keys without the "unet." prefix
    text_embedding: "torch.Tensor"
    metadata: CheckpointMetadata
    path: Path | None = None
    sha256: str = ""

    def lora_modules(self) -> dict[str, tuple["torch.Tensor | None", "torch.Tensor | None"]]:
        """module name -> (A, B); a missing factor is None (validation reports it)."""
        mods: dict[str, list] = {}
        for key, t in self.lora.items():
            for i, suffix in enumerate((".lora_A.weight", ".lora_B.weight")):
                if key.endswith(suffix):
                    mods.setdefault(key[: -len(suffix)], [None, None])[i] = t
        return {k: (v[0], v[1]) for k, v in mods.items()}


def _parse_metadata(meta: Mapping[str, str] | None, problems: list[str]) -> CheckpointMetadata | None:
    meta = dict(meta or {})
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        problems.append("missing metadata: " + ", ".join(missing))
        return None
    if meta["dfosd_format"] != FORMAT_VERSION:
        problems.append(f"dfosd_format is {meta['dfosd_format']!r}; this dfosd reads format {FORMAT_VERSION!r}")
    parsed = {}
    for key, conv in (("timestep", int), ("lora_rank", int), ("lora_alpha", float), ("upscale", int)):
        try:
            parsed[key] = conv(meta[key])
        except ValueError:
            problems.append(f"metadata {key}={meta[key]!r} is not a {conv.__name__}")
    if len(parsed) < 4:
        return None
    extra = {k: v for k, v in meta.items() if k not in REQUIRED_METADATA}
    try:
        return CheckpointMetadata(base_model=meta["base_model"], vae_latent=meta["vae_latent"], extra=extra, **parsed)
    except DfosdError as exc:
        problems.extend(line.strip()[2:] for line in exc.message.splitlines()[1:])
        return None


CHECKPOINT_FIX = "pass the lora.safetensors written by dfosd-train (or dfosd.core.checkpoint.write_checkpoint)"
RANDOM_COMMAND = "dfosd checkpoint random --base synthetic:tiny --out lora.safetensors"  # a test checkpoint


def check_checkpoint_exists(path: str | Path) -> Path:
    """The cheap check before anything is imported or loaded: the file (or PEFT adapter folder) is there."""
    path = Path(path)
    if path.is_dir():
        from dfosd.core.peft_folders import check_adapter_folder

        return check_adapter_folder(path)
    if not path.is_file():
        raise DfosdError(f"checkpoint {path} does not exist",
                         hint=f"{CHECKPOINT_FIX}; to try the pipeline, make a test one: {RANDOM_COMMAND}")
    return path


def check_checkpoint_file(path: str | Path) -> Path:
    """The cheap checks for a DFOSD checkpoint (the file is there, it is .safetensors)."""
    path = check_checkpoint_exists(path)
    if path.suffix != ".safetensors":
        raise DfosdError(f"checkpoint {path} is not a .safetensors file (pickled checkpoints are not loaded)",
                         hint=CHECKPOINT_FIX)
    return path


def read_checkpoint(path: str | Path) -> DfosdCheckpoint:
    """Read and check a checkpoint's own consistency (the base is checked by srmodel.validate_model)."""
    from safetensors import SafetensorError, safe_open

    path = check_checkpoint_file(path)
    fix = CHECKPOINT_FIX
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DfosdError(f"checkpoint {path} is not a readable safetensors file: {exc}", hint=fix) from exc
    problems: list[str] = []
    metadata = _parse_metadata(meta, problems)
    emb = tensors.pop(EMBEDDING_KEY, None)
    if emb is None:
        problems.append(f"tensor {EMBEDDING_KEY!r} is missing")
    lora, unknown = {}, []
    for k, t in tensors.items():
        if k.startswith(UNET_PREFIX) and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")):
            lora[k[len(UNET_PREFIX):]] = t
        else:
            unknown.append(k)
    if unknown:
        problems.append(f"{len(unknown)} unexpected tensor(s), e.g. {', '.join(sorted(unknown)[:3])} "
                        "(expected unet.<module>.lora_A/B.weight and text_embedding)")
    nonfinite = non_finite_names({**{UNET_PREFIX + k: t for k, t in lora.items()},
                                  **({EMBEDDING_KEY: emb} if emb is not None else {})})
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or Inf values: {some_names(nonfinite)} "
                        "(a diverged training run; every output pixel would be 0)")
    if problems:
        raise problems_error(f"checkpoint {path}", problems, hint=fix)
    return DfosdCheckpoint(lora=lora, text_embedding=emb, metadata=metadata, path=path, sha256=sha256_file(path))


def non_finite_names(tensors: Mapping[str, "torch.Tensor"]) -> list[str]:
    """Sorted names of the floating-point tensors holding a NaN or an Inf."""
    import torch

    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def some_names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def lora_target_modules(unet, targets=DEFAULT_LORA_TARGETS) -> list[str]:
    """Names of the UNet's Linear/Conv2d modules that PEFT would match for these targets."""
    from torch import nn

    names = []
    for name, mod in unet.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


def lora_fit_problem(mod, a, b, rank: int, base_label: str) -> str | None:
    """Why factors ``a`` (lora_A) and ``b`` (lora_B, either None when the file lacks it) of a
    rank-``rank`` LoRA cannot apply to ``mod`` (a module of the base named ``base_label``, None when
    the base has no such module), or None when they fit. PEFT's layout: a 3x3 conv's A keeps the kernel, B is 1x1."""
    from torch import nn

    if a is None or b is None:  # a lone factor: format-1 files are read without this check
        have, missing = ("A", "B") if a is not None else ("B", "A")
        return f"has lora_{have} but no lora_{missing}"
    if mod is None:
        return f"no such module in the base {base_label}"
    if isinstance(mod, nn.Linear):
        want_a, want_b = (rank, mod.in_features), (mod.out_features, rank)
    elif isinstance(mod, nn.Conv2d):
        want_a, want_b = (rank, mod.in_channels, *mod.kernel_size), (mod.out_channels, rank, 1, 1)
    else:
        return f"is a {type(mod).__name__}; LoRA is supported on Linear and Conv2d"
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        return (f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"(expected {want_a} / {want_b} for rank {rank})")
    return None


def merge_lora_factors(weight, a, b, scale: float) -> bool:
    """``weight += scale * B @ A`` in fp32, stored back in the weight's dtype, unless the merged
    weight is not finite (finite factors can still overflow, e.g. into an fp16 base): then the
    weight is left as it was and False is returned, for the caller to name it."""
    import torch

    delta = b.float().flatten(1) @ a.float().flatten(1)  # [out, in*kh*kw]
    merged = (weight.float() + scale * delta.view_as(weight)).to(weight.dtype)
    if not bool(torch.isfinite(merged).all()):
        return False
    weight.copy_(merged)
    return True


def write_checkpoint(path: str | Path, *, lora: Mapping[str, "torch.Tensor"], text_embedding: "torch.Tensor",
                     metadata: CheckpointMetadata) -> Path:
    """Write a checkpoint atomically. ``lora`` keys may carry the ``unet.`` prefix or not."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for k, t in lora.items():
        key = k if k.startswith(UNET_PREFIX) else UNET_PREFIX + k
        tensors[key] = t.detach().to("cpu").contiguous()
    tensors[EMBEDDING_KEY] = text_embedding.detach().to("cpu").contiguous()
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata.to_strings())
    return path


def random_lora(base: "Base", *, rank: int = 4, alpha: float = 4.0, tokens: int = 8, seed: int = 0,
                targets=DEFAULT_LORA_TARGETS, lora_std: float = 0.02) -> tuple[dict, "torch.Tensor"]:
    """Random LoRA factors (both non-zero, so the merge changes the UNet) and an embedding."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    modules = dict(base.unet.named_modules())
    lora = {}
    for name in lora_target_modules(base.unet, targets):
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            a_shape, b_shape = (rank, mod.in_features), (mod.out_features, rank)
        else:
            a_shape, b_shape = (rank, mod.in_channels, *mod.kernel_size), (mod.out_channels, rank, 1, 1)
        lora[f"{name}.lora_A.weight"] = torch.randn(a_shape, generator=g) * lora_std
        lora[f"{name}.lora_B.weight"] = torch.randn(b_shape, generator=g) * lora_std
    emb = torch.randn(1, tokens, base.cross_attention_dim, generator=g)
    return lora, emb


def write_random_checkpoint(path: str | Path, base: "Base", *, rank: int = 4, alpha: float = 4.0, tokens: int = 8,
                            seed: int = 0, timestep: int = 999) -> Path:
    """A synthetic checkpoint for tests and demos: valid format, random weights."""
    lora, emb = random_lora(base, rank=rank, alpha=alpha, tokens=tokens, seed=seed)
    meta = CheckpointMetadata(base_model=base.spec, timestep=timestep, lora_rank=rank, lora_alpha=alpha,
                              extra={"dfosd_note": "synthetic random LoRA (does not super-resolve)"})
    return write_checkpoint(path, lora=lora, text_embedding=emb, metadata=meta)
