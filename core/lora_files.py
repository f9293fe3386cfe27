"""UNet LoRA safetensors of the two common layouts, as LoRA sets (``core/readers.py`` detects them).

- diffusers/PEFT: ``[unet.|base_model.model.]<module>.lora_A.weight`` / ``lora_B``; alpha from the
  header when stated, else alpha = rank (diffusers' own rule).
- kohya: ``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` + a per-module ``alpha``;
  alpha 0 or missing reads as alpha = rank, as kohya-ss's ``LoRAModule`` does.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING

from dfosd.core.containers import is_tensor
from dfosd.core.errors import DfosdError
from dfosd.core.srmodel import LoraSet

if TYPE_CHECKING:
    from dfosd.core.bases import Base


def read_diffusers_sets(raw: dict, meta: dict, problems: list[str]) -> list[LoraSet]:
    """diffusers/PEFT UNet LoRA keys -> one LoRA set per rank (alpha: the header's, else rank)."""
    mods: dict[str, list] = {}
    for key, t in raw.items():
        k = key
        for prefix in ("unet.", "base_model.model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        m = re.match(r"^(.+)\.lora_([AB])\.weight$", k)
        if not m or key.startswith(("text_encoder.", "te.")):
            problems.append(f"unexpected tensor {key} (only UNet LoRA factors are read)")
            continue
        mods.setdefault(m[1], [None, None])["AB".index(m[2])] = t
    stated = _stated_alpha(meta, problems)
    return _sets_by_rank(mods, "diffusers", problems, lambda rank: stated if stated is not None else float(rank))


def _stated_alpha(meta: dict, problems: list[str]) -> float | None:
    """The alpha a diffusers/PEFT header states (None: none stated, alpha = rank)."""
    stated = [(key, meta[key]) for key in ("lora_alpha", "alpha") if key in meta]
    blob = meta.get("lora_adapter_metadata")
    if blob and not stated:
        try:
            data = json.loads(blob)
            stated = [(f"lora_adapter_metadata {k}", v) for k, v in data.items() if k.endswith("lora_alpha")][:1]
        except (ValueError, AttributeError):
            problems.append("header lora_adapter_metadata is not a JSON object")
    for key, value in stated[:1]:
        try:
            alpha = float(value)
        except (TypeError, ValueError):
            problems.append(f"header {key} = {value!r} is not a number")
            return None
        if not math.isfinite(alpha) or alpha <= 0:
            problems.append(f"header {key} = {value!r}: alpha must be a finite number > 0")
            return None
        return alpha
    return None


def read_kohya_sets(raw: dict, base: "Base", problems: list[str]) -> list[LoraSet]:
    """kohya keys (module names resolved against ``base``'s UNet) -> one LoRA set per (rank, alpha)."""
    import torch

    names = {("lora_unet_" + n.replace(".", "_")): n for n, _ in base.unet.named_modules() if n}
    mods: dict[str, list] = {}
    alphas = {}
    for key, t in raw.items():
        stem, _, rest = key.partition(".")
        if rest == "alpha":
            if not is_tensor(t) or t.numel() != 1 or not bool(torch.isfinite(t.float()).all()):
                problems.append(f"{key} is {'a tensor of shape ' + str(list(t.shape)) if is_tensor(t) else repr(t)}; "
                                "alpha is one finite number per module")
            else:
                alphas[stem] = float(t)
            continue
        if not stem.startswith("lora_unet_") or rest not in ("lora_down.weight", "lora_up.weight"):
            problems.append(f"unexpected tensor {key} (only lora_unet_*.lora_down/lora_up/alpha are read)")
            continue
        if stem not in names:
            problems.append(f"{stem}: names no module of the base UNet")
            continue
        mods.setdefault(stem, [None, None])[0 if rest == "lora_down.weight" else 1] = t
    # kohya's scale is per module (alpha / rank; alpha missing or 0 reads as alpha = rank, as kohya-ss's
    # LoRAModule does): one set per (rank, alpha), so each set's scale is its modules' real scale
    by_scale: dict[tuple[int, float], dict] = {}
    for stem, ab in mods.items():
        if None in ab:
            continue
        rank = int(ab[0].shape[0])
        alpha = alphas.get(stem) or float(rank)
        by_scale.setdefault((rank, alpha), {})[names[stem]] = (ab[0], ab[1])
    half = [s for s, ab in mods.items() if None in ab]
    if half:
        problems.append(f"{len(half)} module(s) with only one of lora_down/lora_up, e.g. {half[0]}")
    sets = []
    for rank in sorted({r for r, _ in by_scale}):
        alphas_here = sorted(a for r, a in by_scale if r == rank)
        for i, alpha in enumerate(alphas_here):
            name = f"kohya_r{rank}" if len(alphas_here) == 1 else f"kohya_r{rank}_{i}"
            try:
                sets.append(LoraSet(part="unet", name=name, rank=rank, alpha=alpha, group="main",
                                    factors=by_scale[(rank, alpha)]))
            except DfosdError as exc:
                problems.append(exc.message)
    return sets


def _sets_by_rank(mods: dict, prefix: str, problems: list[str], alpha_of) -> list[LoraSet]:
    by_rank: dict[int, dict] = {}
    for name, ab in mods.items():
        if None in ab:
            problems.append(f"{name}: only one of lora_A/lora_B")
            continue
        by_rank.setdefault(int(ab[0].shape[0]), {})[name] = (ab[0], ab[1])
    return [LoraSet(part="unet", name=f"{prefix}_r{r}", rank=r, alpha=alpha_of(r), group="main", factors=f)
            for r, f in sorted(by_rank.items())]
