"""PEFT adapter folders (``PeftModel.save_pretrained``) -> an ``SRModel``.

Layouts
- OMGSR-S: a folder holding ``unet_lora_adapter/`` and ``vae_encoder_lora_adapter/``. OMGSR's
  training wraps the UNet and ``vae.encoder`` in ``PeftModel`` with those adapter names and calls
  ``save_pretrained`` on both into one folder; peft writes an adapter that is not named "default"
  into a sub-folder of its name. Inference loads each with ``PeftModel.from_pretrained`` (on the
  UNet, on ``vae.encoder``) and merges (wuer5/OMGSR train/train_omgsr_s.py lines 60-115, 516-517;
  infer/omgsr_s_infer_model.py lines 15-23). The family is detected from the two names.
- One adapter folder (``adapter_config.json`` + ``adapter_model.safetensors|.bin``): a UNet LoRA;
  the folder does not name a family, so ``--family`` says which (``FOLDER_FAMILIES``).

Each adapter folder: ``adapter_config.json`` (peft_type LORA, ``r``, ``lora_alpha``,
``use_rslora``) and its weights, keys ``base_model.model.<module>.lora_A.weight`` / ``lora_B``
(peft drops the adapter name when saving). The merge scale is the file's: alpha / r, or alpha / √r
with rsLoRA. What a plain merge cannot express (DoRA, LoRA bias, modules_to_save, per-module
rank/alpha patterns) is refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.families import FAMILIES, Family, get_family
from dfosd.core.srmodel import LoraSet, SRModel

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# OMGSR-S's adapter sub-folders -> (part, module prefix inside the part): the VAE adapter wraps vae.encoder
OMGSR_ADAPTERS = {"unet_lora_adapter": ("unet", ""), "vae_encoder_lora_adapter": ("vae", "encoder.")}
KEY_PREFIX = "base_model.model."
LORA_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}
# Families a PEFT folder may be read as: a prompt family whose upstream LoRA is plain (no layer
# replaced whole, one LoRA group); the parts present must be parts the family adapts.
FOLDER_FAMILIES = tuple(n for n, f in FAMILIES.items()
                        if f.conditioning == "prompt" and not f.replaced and f.lora_groups == ("main",))


def is_adapter_folder(path: Path) -> bool:
    """``path`` is a folder this module reads (one adapter, or OMGSR-S's pair)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_NAME).is_file()
                              or any((path / d / CONFIG_NAME).is_file() for d in OMGSR_ADAPTERS))


def check_adapter_folder(path: Path) -> Path:
    """``path`` (a folder) holds PEFT adapters, or a clear error saying what a checkpoint folder must hold."""
    if not is_adapter_folder(path):
        raise DfosdError(f"{path} is a folder without PEFT adapters ({CONFIG_NAME} in it or in "
                         f"{' / '.join(d + '/' for d in OMGSR_ADAPTERS)})",
                         hint="pass a checkpoint file, an OMGSR-S folder (unet_lora_adapter/ and "
                              "vae_encoder_lora_adapter/), or one PEFT adapter folder (adapter_config.json + "
                              "adapter_model.safetensors)")
    return path


def folder_layout(path: Path) -> tuple[str, str | None, str, dict[str, tuple[str, str]]]:
    """(layout, family or None, reason, adapter folder -> (part, prefix)) of an adapter folder."""
    present = [d for d in OMGSR_ADAPTERS if (path / d / CONFIG_NAME).is_file()]
    if present:
        return ("peft-folders", "omgsr-s",
                f"a folder with {' and '.join(d + '/' for d in present)} PEFT adapters (OMGSR-S's save_pretrained "
                "layout)", {d: OMGSR_ADAPTERS[d] for d in present})
    return ("peft-folder", None, f"a PEFT adapter folder ({CONFIG_NAME} + weights) of one UNet LoRA",
            {".": ("unet", "")})


def folder_sha256(path: Path, files: list[Path]) -> str:
    """SHA-256 over the adapter files' names (relative to ``path``) and contents."""
    import hashlib

    from dfosd.core.manifest import sha256_file

    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def _config(folder: Path, problems: list[str]) -> dict | None:
    where = folder / CONFIG_NAME
    try:
        cfg = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{where}: not a readable JSON file ({exc})")
        return None
    if not isinstance(cfg, dict):
        problems.append(f"{where}: not a JSON object")
        return None
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"{where}: peft_type {cfg.get('peft_type')!r}; only LORA adapters merge into the weights")
    unmergeable = {"use_dora": "DoRA's magnitude vectors", "lora_bias": "LoRA biases",
                   "modules_to_save": "modules trained whole (modules_to_save)",
                   "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)"}
    for key, what in unmergeable.items():
        if cfg.get(key):
            problems.append(f"{where}: {key} is set: {what} are not read by dfosd yet")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            problems.append(f"{where}: {key} {value!r} must be a positive number")
    return cfg


def _weights_file(folder: Path, problems: list[str]) -> Path | None:
    found = [folder / n for n in WEIGHT_NAMES if (folder / n).is_file()]
    if not found:
        problems.append(f"{folder}: no adapter weights ({' or '.join(WEIGHT_NAMES)})")
        return None
    return found[0]  # safetensors first, as peft prefers it


def read_adapter(folder: Path, part: str, prefix: str, set_name: str, problems: list[str]) -> tuple[LoraSet | None, list[Path]]:
    """One adapter folder -> a LoRA set of ``part`` (module names prefixed with ``prefix``)."""
    from dfosd.core.readers import load_raw

    cfg, weights = _config(folder, problems), _weights_file(folder, problems)
    if cfg is None or weights is None:
        return None, []
    raw, _ = load_raw(weights)
    mods: dict[str, list] = {}
    for key, t in raw.items():
        name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            problems.append(f"{weights}: unexpected tensor {key} (only <module>.lora_A/lora_B.weight are read)")
            continue
        mods.setdefault(prefix + name[:-len(suffix)], [None, None])[LORA_SUFFIXES[suffix]] = t
    half = sorted(m for m, ab in mods.items() if None in ab)
    if half:
        problems.append(f"{weights}: {len(half)} module(s) with only one of lora_A/lora_B, e.g. {half[0]}")
    if not mods:
        problems.append(f"{weights}: holds no LoRA factors")
    if half or not mods or problems:
        return None, [folder / CONFIG_NAME, weights]
    rank = int(cfg["r"])
    off = sorted(m for m, (a, _) in mods.items() if int(a.shape[0]) != rank)
    if off:
        problems.append(f"{weights}: {len(off)} module(s) whose lora_A rank is not the config's r {rank}, e.g. {off[0]}")
    # peft's scale is lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; LoraSet merges alpha / rank
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(rank) if cfg.get("use_rslora") else 1.0)
    lora = LoraSet(part=part, name=set_name, rank=rank, alpha=alpha, group="main",
                   factors={m: (ab[0], ab[1]) for m, ab in mods.items()})
    return lora, [folder / CONFIG_NAME, weights]


def read_adapter_folders(path: Path, *, family: str | None, prompt: str | None, base_spec: str | None,
                         default_base: str, progress: Callable[[str], None]) -> SRModel:
    """An OMGSR-S folder or one PEFT adapter folder -> SRModel (prompt not encoded yet)."""
    layout, found, reason, adapters = folder_layout(check_adapter_folder(path))
    chosen = family or found
    if chosen is None:
        raise DfosdError(f"{path}: {reason}, which does not name a family",
                         hint=f"pass --family {' or '.join(FOLDER_FAMILIES)} (its timestep, x0 rule and pre-processing)")
    fam: Family = get_family(chosen)
    progress(f"{path.name}: family {fam.name} " + (f"(--family {family}; the folder says {found or 'no family'}: "
                                                   f"{reason})" if family else f"({reason})"))
    problems: list[str] = []
    if fam.name not in FOLDER_FAMILIES:
        problems.append(f"family {fam.name} is not read from PEFT adapter folders (its upstream LoRA is not one plain "
                        f"adapter); families that are: {', '.join(FOLDER_FAMILIES)}")
    sets, files = [], []
    for sub, (part, prefix) in adapters.items():
        if part not in fam.lora_parts:
            problems.append(f"{sub}: family {fam.name} has no LoRA in the {part}")
            continue
        lora, used = read_adapter(path / sub, part, prefix, sub.strip(".") or "peft", problems)
        files += used
        if lora is not None:
            sets.append(lora)
    if problems:
        raise problems_error(f"{path} ({layout} layout)", problems)
    digest = folder_sha256(path, files)
    return SRModel(family=fam, base_model=base_spec or default_base, lora_sets=tuple(sets), replacements={},
                   text_embedding=None, timestep=fam.timestep, x0_rule=fam.x0_rule, preprocess=fam.preprocess,
                   color_fix=fam.color_fix, upscale=fam.upscale,
                   prompt=fam.default_prompt if prompt is None else prompt,
                   source={"file": path.name, "sha256": digest, "layout": layout, "detected": reason},
                   path=path, sha256=digest)
