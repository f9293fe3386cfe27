"""Read any supported checkpoint into an ``SRModel``: detect the family from the keys, say why.

Containers: safetensors, or a pickle (``torch.save``) loaded ONLY with
``torch.load(weights_only=True)``. A pickle that needs more than tensors and plain containers
is refused and never unpickled.

Layouts
- dfosd format 1 / 2 (safetensors with ``dfosd_format``)
- OSEDiff ``osediff.pkl``: dict with ``unet_lora_*_modules``, ``rank_unet``, ``state_dict_unet``,
  ``state_dict_vae`` (peft adapters default_encoder/decoder/others; conv_in retrained whole)
- PiSA-SR ``pisa_sr.pkl``: the same with ``_pix`` / ``_sem`` adapters and ranks
- HYPIR ``HYPIR_sd2.pth``: a state dict of ``<module>.lora_A.default.weight`` / ``lora_B``
- diffusers/PEFT UNet LoRA: ``[unet.|base_model.model.]<module>.lora_A.weight`` (alpha from the
  header when stated, else alpha = rank: diffusers' own rule)
- kohya: ``lora_unet_<module_with_underscores>.lora_down/lora_up.weight`` + per-module ``alpha``
- PEFT adapter folders (OMGSR-S's ``unet_lora_adapter/`` + ``vae_encoder_lora_adapter/``): core/peft_folders.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.families import NOT_SUPPORTED, Family, get_family, lora_alpha
from dfosd.core.srmodel import LoraSet, SRModel, parse_format2

if TYPE_CHECKING:
    from dfosd.core.bases import Base

DEFAULT_FAMILY_BASE = "stabilityai/stable-diffusion-2-1-base"
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class Detected:
    layout: str
    family: str | None  # None: the keys do not name one (generic UNet LoRA)
    reason: str


def load_raw(path: Path) -> tuple[dict, dict]:
    """(tensors or plain containers, safetensors header) of a file, never running pickled code."""
    if not path.is_file():
        raise DfosdError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)
    if path.suffix == ".safetensors" or looks_safetensors:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise DfosdError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    return _load_pickle(path), {}


def safetensors_metadata(path: Path) -> dict:
    """The header metadata of a safetensors file, without reading its tensors ({} when it is not one)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a (readable) safetensors file
        return {}


def _load_pickle(path: Path) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else "")
        raise DfosdError(
            f"checkpoint {path} is a pickle that needs more than tensors to load; it was refused and not "
            f"unpickled ({detail.strip()})",
            hint="pickles can run code when loaded: convert it with its own project's code in a sandbox to "
                 "safetensors, or ask its authors for a tensors-only file") from None
    except Exception as exc:  # torch raises many types for files that are not checkpoints at all
        raise DfosdError(f"checkpoint {path} is neither safetensors nor a torch.save pickle: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(obj, dict):
        raise DfosdError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def detect(raw: dict, meta: dict) -> Detected:
    """Which layout and family the keys say, and why (one sentence)."""
    keys = set(raw)
    if "dfosd_format" in meta:
        return Detected(f"dfosd{meta['dfosd_format']}", meta.get("family", "dfosd"),
                        f"safetensors header dfosd_format={meta['dfosd_format']}")
    s3 = {"state_dict_unet_de_mlp", "state_dict_vae_de_mlp", "unet_lora_target_modules", "state_embeddings"}
    if keys & s3:
        return Detected("s3diff", "s3diff", f"keys {sorted(keys & s3)[:2]} are S3Diff's degradation-aware LoRA")
    if {"unet_lora_encoder_modules_pix", "lora_rank_unet_pix", "state_dict_unet"} <= keys:
        return Detected("pisa-sr", "pisa-sr", "dict with unet_lora_*_modules_pix/_sem and lora_rank_unet_pix/_sem "
                                              "(PiSA-SR's save_model)")
    if {"unet_lora_encoder_modules", "rank_unet", "state_dict_unet"} <= keys:
        return Detected("osediff", "osediff", "dict with unet_lora_encoder/decoder/others_modules, rank_unet, "
                                              "state_dict_unet and state_dict_vae (OSEDiff's save_model)")
    tensor_keys = [k for k in keys if _is_tensor(raw[k])]
    if any(k.startswith(("transformer.", "transformer_blocks.")) or "context_embedder" in k for k in tensor_keys):
        return Detected("sd3", "tsd-sr", "transformer_blocks/context_embedder keys: an SD3 (MMDiT) model, as TSD-SR")
    if tensor_keys and all(PEFT_KEY.match(k) and PEFT_KEY.match(k)["adapter"] == "default" for k in tensor_keys):
        return Detected("hypir", "hypir", "a state dict of <module>.lora_A/B.default.weight only "
                                          "(HYPIR's HYPIR_sd2.pth: peft adapter 'default', no other tensors)")
    if any(k.startswith("lora_unet_") for k in tensor_keys):
        return Detected("kohya", meta.get("family"), "lora_unet_* keys with lora_down/lora_up (kohya's layout)")
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensor_keys):
        return Detected("diffusers", meta.get("family"), "<module>.lora_A/B.weight keys (diffusers/PEFT layout)")
    return Detected("unknown", None, "")


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _peft_sets(state: dict, part: str, ranks: dict[str, int], family: Family, problems: list[str],
               groups: Callable[[str], str] = lambda adapter: "main") -> tuple[list[LoraSet], dict]:
    """peft state dict (``<module>.lora_A.<adapter>.weight``) -> LoRA sets + replaced parameters."""
    by_adapter: dict[str, dict[str, list]] = {}
    replaced = {}
    for key, t in state.items():
        m = PEFT_KEY.match(key)
        if m:
            by_adapter.setdefault(m["adapter"], {}).setdefault(m["module"], [None, None])["AB".index(m["ab"])] = t
            continue
        m = BASE_LAYER_KEY.match(key)
        if m and f"{part}.{m['module']}.{m['param']}" in family.replaced:
            replaced[f"{part}.{m['module']}.{m['param']}"] = t
        else:
            problems.append(f"{part}: unexpected tensor {key}")
    sets = []
    for adapter, mods in sorted(by_adapter.items()):
        half = sorted(m for m, ab in mods.items() if None in ab)
        if half:
            problems.append(f"{part}.{adapter}: {len(half)} module(s) with only one of lora_A/lora_B, e.g. {half[0]}")
            continue
        rank = ranks.get(adapter) or int(next(iter(mods.values()))[0].shape[0])
        sets.append(LoraSet(part=part, name=adapter, rank=rank, alpha=lora_alpha(family, rank),
                            group=groups(adapter), factors={m: (ab[0], ab[1]) for m, ab in mods.items()}))
    return sets, replaced


def _check_listed(sets: list[LoraSet], listed: dict[str, list], problems: list[str]) -> None:
    """The module lists saved next to the weights must name exactly the adapted modules."""
    for s in sets:
        want = set(listed.get(s.name, ()))
        have = set(s.factors)
        if want and want != have:
            extra, missing = sorted(have - want), sorted(want - have)
            problems.append(f"{s.part}.{s.name}: the saved module list and the weights disagree "
                            f"({len(missing)} listed without weights, {len(extra)} weights not listed)")


def _osediff(raw: dict, family: Family, problems: list[str]):
    unet_sets, replaced = _peft_sets(raw["state_dict_unet"], "unet", {}, family, problems)
    rank_unet, rank_vae = int(raw["rank_unet"]), int(raw.get("rank_vae", raw["rank_unet"]))
    for s in unet_sets:
        if s.rank != rank_unet:
            problems.append(f"unet.{s.name}: rank {s.rank} but rank_unet is {rank_unet}")
    vae_sets, vae_replaced = _peft_sets(raw.get("state_dict_vae", {}), "vae", {}, family, problems)
    for s in vae_sets:
        if s.rank != rank_vae:
            problems.append(f"vae.{s.name}: rank {s.rank} but rank_vae is {rank_vae}")
    listed = {f"default_{k}": raw.get(f"unet_lora_{k}_modules", []) for k in ("encoder", "decoder", "others")}
    _check_listed(unet_sets, listed, problems)
    _check_listed(vae_sets, {"default_encoder": raw.get("vae_lora_encoder_modules", [])}, problems)
    missing = [r for r in family.replaced if r not in replaced]
    if missing:
        problems.append(f"retrained layer(s) missing: {', '.join(missing)} (OSEDiff saves conv_in.base_layer)")
    return unet_sets + vae_sets, {**replaced, **vae_replaced}


def _pisa(raw: dict, family: Family, problems: list[str]):
    ranks = {}
    for g in ("pix", "sem"):
        for k in ("encoder", "decoder", "others"):
            ranks[f"default_{k}_{g}"] = int(raw[f"lora_rank_unet_{g}"])
    sets, replaced = _peft_sets(raw["state_dict_unet"], "unet", ranks, family, problems,
                                groups=lambda a: a.rsplit("_", 1)[-1])
    for s in sets:
        if s.group not in family.lora_groups:
            problems.append(f"unet.{s.name}: adapter is neither _pix nor _sem")
        if int(next(iter(s.factors.values()))[0].shape[0]) != s.rank:
            problems.append(f"unet.{s.name}: lora_A rank differs from lora_rank_unet_{s.group} ({s.rank})")
    listed = {f"default_{k}_{g}": raw.get(f"unet_lora_{k}_modules_{g}", [])
              for g in ("pix", "sem") for k in ("encoder", "decoder", "others")}
    _check_listed(sets, listed, problems)
    return sets, replaced


def _diffusers(raw: dict, meta: dict, problems: list[str]) -> list[LoraSet]:
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
    stated = _stated_alpha(meta)
    return _sets_by_rank(mods, "diffusers", problems, lambda rank: stated if stated is not None else float(rank))


def _stated_alpha(meta: dict) -> float | None:
    for key in ("lora_alpha", "alpha"):
        if key in meta:
            return float(meta[key])
    blob = meta.get("lora_adapter_metadata")
    if blob:
        try:
            data = json.loads(blob)
            for k, v in data.items():
                if k.endswith("lora_alpha"):
                    return float(v)
        except (ValueError, AttributeError):
            pass
    return None


def _kohya(raw: dict, base: "Base", problems: list[str]) -> list[LoraSet]:
    names = {("lora_unet_" + n.replace(".", "_")): n for n, _ in base.unet.named_modules() if n}
    mods: dict[str, list] = {}
    alphas = {}
    for key, t in raw.items():
        stem, _, rest = key.partition(".")
        if rest == "alpha":
            alphas[stem] = float(t)
            continue
        if not stem.startswith("lora_unet_") or rest not in ("lora_down.weight", "lora_up.weight"):
            problems.append(f"unexpected tensor {key} (only lora_unet_*.lora_down/lora_up/alpha are read)")
            continue
        if stem not in names:
            problems.append(f"{stem}: names no module of the base UNet")
            continue
        mods.setdefault(stem, [None, None])[0 if rest == "lora_down.weight" else 1] = t
    folded = {}
    for stem, ab in mods.items():
        if None in ab:
            continue
        rank = int(ab[0].shape[0])
        # kohya's scale is per module (alpha / rank); fold it into lora_B so one set per rank keeps it
        scale = alphas.get(stem, float(rank)) / rank
        folded[names[stem]] = [ab[0], ab[1] * scale]
    half = [s for s, ab in mods.items() if None in ab]
    if half:
        problems.append(f"{len(half)} module(s) with only one of lora_down/lora_up, e.g. {half[0]}")
    return _sets_by_rank(folded, "kohya", problems, lambda rank: float(rank))


def _sets_by_rank(mods: dict, prefix: str, problems: list[str], alpha_of) -> list[LoraSet]:
    by_rank: dict[int, dict] = {}
    for name, ab in mods.items():
        if None in ab:
            problems.append(f"{name}: only one of lora_A/lora_B")
            continue
        by_rank.setdefault(int(ab[0].shape[0]), {})[name] = (ab[0], ab[1])
    return [LoraSet(part="unet", name=f"{prefix}_r{r}", rank=r, alpha=alpha_of(r), group="main", factors=f)
            for r, f in sorted(by_rank.items())]


def read_model(path: str | Path, *, family: str | None = None, base_spec: str | None = None,
               prompt: str | None = None, base: "Base | None" = None,
               progress: Callable[[str], None] = lambda msg: None, encode: bool = True) -> SRModel:
    """Any supported checkpoint -> SRModel. Prompt families encode their prompt here, once
    (``encode=False``: not at all, the embedding stays None: enough to inspect a file)."""
    from dfosd.core.manifest import sha256_file

    path = Path(path)
    if family is not None:
        get_family(family)  # a family dfosd refuses (e.g. osdface) says why before any reading
    if path.is_dir():  # PEFT adapter folders (OMGSR-S), see core/peft_folders.py
        from dfosd.core.peft_folders import read_adapter_folders

        model = read_adapter_folders(path, family=family, prompt=prompt, default_base=DEFAULT_FAMILY_BASE,
                                     base_spec=base_spec or (base.spec if base is not None else None), progress=progress)
        return with_encoded_prompt(model, progress) if encode else model
    if (path.parent / "embedding_change_weights.pth").is_file():
        # OSDFace ships its UNet LoRA (diffusers layout) beside the network that makes its conditioning
        raise DfosdError(f"{path} sits beside embedding_change_weights.pth: an OSDFace checkpoint; not supported: "
                         f"{NOT_SUPPORTED['osdface']}")
    raw, meta = load_raw(path)
    found = detect(raw, meta)
    if found.layout.startswith("dfosd"):
        return _read_dfosd(path, raw, meta, found, family, prompt)
    if found.family in NOT_SUPPORTED:
        raise DfosdError(f"{path} looks like a {found.family} checkpoint ({found.reason}); not supported: "
                         f"{NOT_SUPPORTED[found.family]}")
    if found.layout == "unknown":
        sample = ", ".join(sorted(map(str, raw))[:5])
        raise DfosdError(f"{path}: the keys fit no supported layout (first keys: {sample})",
                         hint="supported: dfosd format 1/2, osediff.pkl, pisa_sr.pkl, HYPIR_sd2.pth, diffusers/PEFT "
                              "or kohya UNet LoRA safetensors")
    chosen = family or found.family
    if chosen is None:
        raise DfosdError(f"{path}: {found.reason}, but the keys do not name a family",
                         hint="pass --family osediff, pisa-sr or hypir (its timestep, x0 rule and pre-processing)")
    fam = get_family(chosen)
    why = f"(--family {family}; the keys say {found.family or 'no family'}: {found.reason})" if family \
        else f"({found.reason})"
    progress(f"{path.name}: family {fam.name} {why}")
    problems: list[str] = []
    if fam.conditioning != "prompt":
        problems.append(f"family {fam.name} needs a learned embedding, which a {found.layout} checkpoint does not hold")
    replaced: dict = {}
    if found.layout == "osediff":
        sets, replaced = _osediff(raw, fam, problems)
    elif found.layout == "pisa-sr":
        sets, replaced = _pisa(raw, fam, problems)
    elif found.layout == "hypir":
        sets, replaced = _peft_sets(raw, "unet", {}, fam, problems)
    elif found.layout == "diffusers":
        sets = _diffusers(raw, meta, problems)
    else:  # kohya: module names are resolved against the base
        base = base or _load_base(base_spec or DEFAULT_FAMILY_BASE, progress)
        sets = _kohya(raw, base, problems)
    if found.family and family and found.family != family and found.layout in ("osediff", "pisa-sr", "hypir"):
        progress(f"note: the keys are {found.family}'s layout; building it as {fam.name} because of --family")
    if problems:
        raise problems_error(f"{path} ({found.layout} layout)", problems)
    base_spec = base_spec or (base.spec if base is not None else DEFAULT_FAMILY_BASE)
    digest = sha256_file(path)
    model = SRModel(family=fam, base_model=base_spec, lora_sets=tuple(sets), replacements=replaced,
                    text_embedding=None, timestep=fam.timestep, x0_rule=fam.x0_rule, preprocess=fam.preprocess,
                    color_fix=fam.color_fix, upscale=fam.upscale,
                    prompt=fam.default_prompt if prompt is None else prompt,
                    source={"file": path.name, "sha256": digest, "layout": found.layout, "detected": found.reason},
                    path=path, sha256=digest)
    return with_encoded_prompt(model, progress) if encode else model


def with_encoded_prompt(model: SRModel, progress: Callable[[str], None] = lambda msg: None) -> SRModel:
    """``model`` with its prompt encoded by its base's tokenizer and text encoder, when it is a
    prompt family's and not encoded yet (``read_model(encode=False)``); else ``model`` itself."""
    if model.text_embedding is not None or model.family.conditioning != "prompt":
        return model
    from dataclasses import replace

    from dfosd.core.text import encode_prompt

    progress(f"encoding the prompt {model.prompt!r} with {model.base_model}'s tokenizer and text encoder "
             "(once: the engine holds the embedding)")
    return replace(model, text_embedding=encode_prompt(model.base_model, model.prompt))


def _load_base(spec: str, progress) -> "Base":
    from dfosd.core.bases import load_base

    progress(f"loading base {spec} (kohya names are resolved against its UNet)")
    return load_base(spec)


def _read_dfosd(path: Path, raw: dict, meta: dict, found: Detected, family: str | None,
                prompt: str | None) -> SRModel:
    from dfosd.core.manifest import sha256_file

    if family and family != found.family:
        raise DfosdError(f"{path} is a dfosd file of family {found.family}; --family {family} cannot change it",
                         hint="drop --family, or convert the original checkpoint again with it")
    if prompt is not None:
        raise DfosdError(f"{path} already holds its conditioning; --prompt applies when converting an upstream "
                         "checkpoint", hint="run `dfosd convert ORIGINAL --prompt TEXT` instead")
    if meta["dfosd_format"] == "1":
        from dfosd.core.checkpoint import read_checkpoint
        from dfosd.core.srmodel import from_format1

        return from_format1(read_checkpoint(path))
    if meta["dfosd_format"] != "2":
        raise DfosdError(f"{path}: dfosd_format {meta['dfosd_format']!r} is newer than this dfosd reads (1, 2)",
                         hint="upgrade dfosd")
    return parse_format2(path, meta, raw, sha256_file(path))


def read_model_as_exported(path: str | Path, manifest: dict) -> SRModel:
    """The model an export was made from, read again as the export read it: an upstream
    checkpoint with the family and prompt its manifest records (dfosd files hold their own)."""
    path = Path(path)
    meta = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if "dfosd_format" in meta:
        return read_model(path)
    fam = manifest.get("family") or {}
    model = read_model(path, family=fam.get("name"), prompt=fam.get("prompt"),
                       base_spec=manifest.get("inputs", {}).get("base"))
    timestep = manifest.get("timestep")  # `dfosd-export --timestep` overrides the family's
    return model.with_timestep(timestep) if isinstance(timestep, int) and timestep != model.timestep else model
