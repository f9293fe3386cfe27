"""Read any supported checkpoint into an ``SRModel``: detect the family from the keys, say why.

Containers (``core/containers.py``): safetensors, or a pickle (``torch.save``) loaded ONLY with
``torch.load(weights_only=True)``; a pickle that needs more than tensors and plain containers
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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dfosd.core.containers import is_tensor, load_raw, safetensors_metadata  # noqa: F401 - re-exported
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.families import NOT_SUPPORTED, Family, get_family, lora_alpha
from dfosd.core.lora_files import read_diffusers_sets, read_kohya_sets
from dfosd.core.srmodel import LoraSet, SRModel, parse_format2

if TYPE_CHECKING:
    from dfosd.core.bases import Base
    from dfosd.core.manifest import ExportDir

DEFAULT_FAMILY_BASE = "stabilityai/stable-diffusion-2-1-base"
PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class Detected:
    layout: str
    family: str | None  # None: the keys do not name one (generic UNet LoRA)
    reason: str


def _rank(raw: dict, key: str, problems: list[str]) -> int | None:
    """A rank field as the upstream saver wrote it (a Python int; LoraConfig(r=...) takes nothing else)."""
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        problems.append(f"{key} is {v!r}; expected a positive integer (a LoRA rank)" if key in raw
                        else f"{key} is missing (the LoRA rank the upstream loader reads)")
        return None
    return v


def _state_dict(raw: dict, key: str, problems: list[str]) -> dict:
    """``raw[key]`` when it is a dict of name -> tensor, else {} and the problem."""
    v = raw.get(key, {})
    if not isinstance(v, dict):
        problems.append(f"{key} is a {type(v).__name__}, expected a dict of name -> tensor")
        return {}
    return _tensors_only(v, key, problems)


def _tensors_only(state: dict, where: str, problems: list[str]) -> dict:
    odd = sorted(str(k) for k, t in state.items() if not isinstance(k, str) or not is_tensor(t))
    if odd:
        problems.append(f"{where}: {len(odd)} entr(ies) that are not name -> tensor, e.g. {odd[0]}")
        return {k: t for k, t in state.items() if isinstance(k, str) and is_tensor(t)}
    return state


def _module_list(raw: dict, key: str, problems: list[str]) -> list[str]:
    v = raw.get(key, [])
    if not isinstance(v, (list, tuple)) or not all(isinstance(m, str) for m in v):
        problems.append(f"{key} is not a list of module names")
        return []
    return list(v)


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
    tensor_keys = [k for k in keys if is_tensor(raw[k])]
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


def _check_listed(sets: list[LoraSet], listed: dict[str, list], problems: list[str], state: dict) -> None:
    """The module lists saved next to the weights must name exactly the adapted modules (the
    upstream loaders make an adapter for every listed module and copy its weights by name)."""
    present = {m["adapter"] for m in map(PEFT_KEY.match, state) if m}
    for name, modules in listed.items():
        if modules and name not in present:
            problems.append(f"adapter {name}: {len(set(modules))} module(s) listed, but the file holds no weights "
                            "for them (the upstream loader would fail)")
    for s in sets:
        want = set(listed.get(s.name, ()))
        have = set(s.factors)
        if want and want != have:
            extra, missing = sorted(have - want), sorted(want - have)
            problems.append(f"{s.part}.{s.name}: the saved module list and the weights disagree "
                            f"({len(missing)} listed without weights, {len(extra)} weights not listed)")


def _osediff(raw: dict, family: Family, problems: list[str]):
    unet_state = _state_dict(raw, "state_dict_unet", problems)
    unet_sets, replaced = _peft_sets(unet_state, "unet", {}, family, problems)
    rank_unet = _rank(raw, "rank_unet", problems)
    for s in unet_sets:
        if rank_unet is not None and s.rank != rank_unet:
            problems.append(f"unet.{s.name}: rank {s.rank} but rank_unet is {rank_unet}")
    vae_listed = _module_list(raw, "vae_lora_encoder_modules", problems)
    if vae_listed and "state_dict_vae" not in raw:
        # OSEDiff's load_ckpt adds a VAE adapter for the listed modules and copies each one's LoRA
        # from state_dict_vae: without it, upstream fails; exporting without them would be another model
        problems.append(f"vae_lora_encoder_modules lists {len(set(vae_listed))} VAE-encoder module(s) but the "
                        "file has no state_dict_vae (their LoRA weights)")
    vae_state = _state_dict(raw, "state_dict_vae", problems)
    vae_sets, vae_replaced = _peft_sets(vae_state, "vae", {}, family, problems)
    rank_vae = _rank(raw, "rank_vae", problems) if vae_sets or vae_listed else None
    for s in vae_sets:
        if rank_vae is not None and s.rank != rank_vae:
            problems.append(f"vae.{s.name}: rank {s.rank} but rank_vae is {rank_vae}")
    listed = {f"default_{k}": _module_list(raw, f"unet_lora_{k}_modules", problems)
              for k in ("encoder", "decoder", "others")}
    _check_listed(unet_sets, listed, problems, unet_state)
    if "state_dict_vae" in raw:
        _check_listed(vae_sets, {"default_encoder": vae_listed}, problems, vae_state)
    missing = [r for r in family.replaced if r not in replaced]
    if missing:
        problems.append(f"retrained layer(s) missing: {', '.join(missing)} (OSEDiff saves conv_in.base_layer)")
    return unet_sets + vae_sets, {**replaced, **vae_replaced}


def _pisa(raw: dict, family: Family, problems: list[str]):
    ranks = {}
    for g in ("pix", "sem"):
        rank = _rank(raw, f"lora_rank_unet_{g}", problems)
        for k in ("encoder", "decoder", "others"):
            if rank is not None:
                ranks[f"default_{k}_{g}"] = rank
    state = _state_dict(raw, "state_dict_unet", problems)
    sets, replaced = _peft_sets(state, "unet", ranks, family, problems, groups=lambda a: a.rsplit("_", 1)[-1])
    for s in sets:
        if s.group not in family.lora_groups:
            problems.append(f"unet.{s.name}: adapter is neither _pix nor _sem")
        if int(next(iter(s.factors.values()))[0].shape[0]) != s.rank:
            problems.append(f"unet.{s.name}: lora_A rank differs from lora_rank_unet_{s.group} ({s.rank})")
    listed = {f"default_{k}_{g}": _module_list(raw, f"unet_lora_{k}_modules_{g}", problems)
              for g in ("pix", "sem") for k in ("encoder", "decoder", "others")}
    _check_listed(sets, listed, problems, state)
    return sets, replaced


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
        from dfosd.core.resshift_reader import looks_like_resshift, not_exportable_yet

        if looks_like_resshift(raw):
            raise not_exportable_yet(path)
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
    if found.layout == "kohya":  # module names are resolved against the base
        base = base or _load_base(base_spec or DEFAULT_FAMILY_BASE, progress)
    try:
        if found.layout == "osediff":
            sets, replaced = _osediff(raw, fam, problems)
        elif found.layout == "pisa-sr":
            sets, replaced = _pisa(raw, fam, problems)
        elif found.layout == "hypir":
            sets, replaced = _peft_sets(_tensors_only(raw, "the state dict", problems), "unet", {}, fam, problems)
        elif found.layout == "diffusers":
            sets = read_diffusers_sets(raw, meta, problems)
        else:
            sets = read_kohya_sets(raw, base, problems)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
        # the checks above name the cases seen; anything else malformed is still the file's fault
        problems.append(f"malformed contents ({type(exc).__name__}: {exc})")
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


def read_model_as_exported(path: str | Path, export: "ExportDir") -> SRModel:
    """The model an export was made from, read again as the export read it: an upstream
    checkpoint with the family and prompt its manifest records (dfosd files hold their own)."""
    path = Path(path)
    meta = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if "dfosd_format" in meta:
        return read_model(path)
    fam = export.family
    model = read_model(path, family=fam.get("name"), prompt=fam.get("prompt"), base_spec=export.inputs.get("base"))
    timestep = export.timestep  # `dfosd-export --timestep` overrides the family's
    return model.with_timestep(timestep) if timestep is not None and timestep != model.timestep else model
