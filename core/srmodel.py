"""What export bakes, for every family: ``SRModel``, and its file, dfosd format 2.

Format 2 (``dfosd convert`` writes it; one safetensors file, nothing to unpickle)

Tensors
- ``lora.<part>.<set>.<module>.lora_A.weight`` / ``...lora_B.weight``: PEFT LoRA factors of
  one LoRA set (``part`` unet or vae; ``set`` an upstream adapter name without dots;
  ``module`` the module's name inside the part). Linear: A [r, in], B [out, r].
  Conv2d: A [r, in, kh, kw], B [out, r, 1, 1].
- ``replace.<part>.<parameter>``: a base parameter replaced whole (OSEDiff's conv_in).
- ``text_embedding``: float [1, N, cross_attention_dim], the conditioning (learned, or the
  prompt already through the base's tokenizer and text encoder).
Metadata (all strings): dfosd_format "2", family, base_model, timestep, x0_rule,
conditioning, prompt (JSON string or "null"), preprocess, color_fix, upscale,
vae_latent "mean", lora_sets (JSON list of {part, name, rank, alpha, group}), source (JSON).

A format-1 checkpoint (DFOSD's ``lora.safetensors``) is read as family ``dfosd`` unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from dfosd.core.atomic import atomic_target
from dfosd.core.checkpoint import lora_fit_problem, merge_lora_factors, some_names
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.families import COLOR_FIXES, LORA_PARTS, PREPROCESSINGS, X0_RULES, Family, get_family

if TYPE_CHECKING:
    import torch

    from dfosd.core.bases import Base

FORMAT_VERSION = "2"
EMBEDDING_KEY = "text_embedding"
MAX_TOKENS = 77
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraSet:
    """One adapter: module -> (A, B), merged as W += (alpha / rank) * B @ A."""

    part: str
    name: str
    rank: int
    alpha: float
    group: str
    factors: Mapping[str, tuple["torch.Tensor", "torch.Tensor"]]

    def __post_init__(self):
        problems = []
        if self.part not in LORA_PARTS:
            problems.append(f"part {self.part!r} is not one of {', '.join(LORA_PARTS)}")
        if "." in self.name or not self.name:
            problems.append(f"set name {self.name!r} must be non-empty without dots")
        if self.rank < 1 or not math.isfinite(self.alpha) or self.alpha <= 0:  # nan passes "<= 0"
            problems.append(f"rank {self.rank} / alpha {self.alpha} must be positive (alpha a finite number)")
        if problems:
            raise problems_error(f"LoRA set {self.part}.{self.name}", problems)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def header(self) -> dict:
        return {"part": self.part, "name": self.name, "rank": self.rank, "alpha": self.alpha, "group": self.group}


@dataclass(frozen=True)
class SRModel:
    family: Family
    base_model: str
    lora_sets: tuple[LoraSet, ...]
    replacements: Mapping[str, "torch.Tensor"]  # "<part>.<parameter>" -> tensor
    text_embedding: "torch.Tensor | None"  # None: a prompt not encoded yet (inspection only)
    timestep: int
    x0_rule: str
    preprocess: str
    color_fix: str
    upscale: int
    prompt: str | None = None
    source: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""

    def __post_init__(self):
        problems = []
        if not 0 <= self.timestep <= 999:
            problems.append(f"timestep {self.timestep} is outside [0, 999]")
        for attr, allowed in (("x0_rule", X0_RULES), ("preprocess", PREPROCESSINGS), ("color_fix", COLOR_FIXES)):
            if getattr(self, attr) not in allowed:
                problems.append(f"{attr} {getattr(self, attr)!r} is not one of {', '.join(allowed)}")
        if self.upscale < 1:
            problems.append(f"upscale {self.upscale} must be >= 1")
        names = [(s.part, s.name) for s in self.lora_sets]
        if len(set(names)) != len(names):
            problems.append("two LoRA sets share a part and name")
        if problems:
            raise problems_error(f"model ({self.family.name})", problems)

    def with_timestep(self, timestep: int) -> "SRModel":
        """This model at another fixed timestep (``--timestep``); DFOSD's own checkpoints hold theirs."""
        if self.family.name == "dfosd" and timestep != self.timestep:
            raise DfosdError(f"{self.path} is a DFOSD checkpoint trained at timestep {self.timestep}; --timestep "
                             "applies to upstream families", hint="drop --timestep")
        from dataclasses import replace

        return replace(self, timestep=int(timestep))

    def deviations(self) -> list[str]:
        """What differs from upstream inference, for the manifest and ``dfosd inspect``."""
        out = list(self.family.deviations)
        fam = self.family
        for attr in ("timestep", "x0_rule", "preprocess"):
            if getattr(self, attr) != getattr(fam, attr):
                out.append(f"{attr} {getattr(self, attr)} instead of upstream's {getattr(fam, attr)}")
        return out

    def summary(self) -> dict:
        """What export will bake (JSON-ready)."""
        parts: dict[str, dict] = {}
        for s in self.lora_sets:
            p = parts.setdefault(s.part, {"layers": set(), "parameters": 0, "sets": []})
            p["layers"].update(s.factors)
            p["parameters"] += sum(a.numel() + b.numel() for a, b in s.factors.values())
            p["sets"].append({**s.header(), "layers": len(s.factors), "scale": s.scale})
        for p in parts.values():
            p["layers"] = len(p["layers"])
        return {
            **self.family.summary(),
            "base_model": self.base_model, "timestep": self.timestep, "x0_rule": self.x0_rule,
            "preprocess": self.preprocess, "color_fix": self.color_fix, "upscale": self.upscale,
            "prompt": self.prompt, "lora": parts,
            "embedding_shape": None if self.text_embedding is None else list(self.text_embedding.shape),
            "replaced": {k: list(v.shape) for k, v in self.replacements.items()},
            "deviations": self.deviations(), "source": dict(self.source),
        }


def from_format1(ckpt) -> SRModel:
    """A DFOSD format-1 checkpoint as family ``dfosd`` (its fields unchanged)."""
    meta = ckpt.metadata
    factors = {name: ab for name, ab in ckpt.lora_modules().items()}
    lora = LoraSet(part="unet", name="dfosd", rank=meta.lora_rank, alpha=meta.lora_alpha, group="main",
                   factors=factors)
    return SRModel(family=get_family("dfosd"), base_model=meta.base_model, lora_sets=(lora,), replacements={},
                   text_embedding=ckpt.text_embedding, timestep=meta.timestep, x0_rule="ddpm",
                   preprocess="torch-bicubic", color_fix="none", upscale=meta.upscale,
                   source={"format": "dfosd 1"}, path=ckpt.path, sha256=ckpt.sha256)


def write_model(path: str | Path, model: SRModel) -> Path:
    """Write ``model`` as dfosd format 2, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for s in model.lora_sets:
        for module, (a, b) in s.factors.items():
            for suffix, t in zip(LORA_SUFFIXES, (a, b)):
                tensors[f"lora.{s.part}.{s.name}.{module}{suffix}"] = t.detach().cpu().contiguous()
    for key, t in model.replacements.items():
        tensors[f"replace.{key}"] = t.detach().cpu().contiguous()
    tensors[EMBEDDING_KEY] = model.text_embedding.detach().cpu().float().contiguous()
    meta = {
        "dfosd_format": FORMAT_VERSION, "family": model.family.name, "base_model": model.base_model,
        "timestep": str(model.timestep), "x0_rule": model.x0_rule, "conditioning": model.family.conditioning,
        "prompt": json.dumps(model.prompt), "preprocess": model.preprocess, "color_fix": model.color_fix,
        "upscale": str(model.upscale), "vae_latent": "mean",
        "lora_sets": json.dumps([s.header() for s in model.lora_sets]), "source": json.dumps(dict(model.source)),
    }
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def parse_format2(path: Path, meta: Mapping[str, str], tensors: dict, sha256: str) -> SRModel:
    """Build an SRModel from a format-2 file's header and tensors; every problem in one error."""
    problems: list[str] = []
    need = ("family", "base_model", "timestep", "x0_rule", "prompt", "preprocess", "color_fix", "upscale",
            "lora_sets")
    missing = [k for k in need if k not in meta]
    if missing:
        raise problems_error(f"model file {path}", [f"missing metadata: {', '.join(missing)}"])
    try:
        family = get_family(meta["family"])
        headers = _set_headers(json.loads(meta["lora_sets"]))
        prompt = json.loads(meta["prompt"])
        source = json.loads(meta.get("source", "{}"))
        timestep, upscale = int(meta["timestep"]), int(meta["upscale"])
    except (ValueError, DfosdError) as exc:
        raise problems_error(f"model file {path}", [f"unreadable metadata: {exc}"],
                             hint="re-create it with `dfosd convert`") from None
    if prompt is not None and not isinstance(prompt, str) or not isinstance(source, dict):
        raise problems_error(f"model file {path}", ["unreadable metadata: prompt is not a string or null, or "
                                                    "source is not a JSON object"],
                             hint="re-create it with `dfosd convert`")
    emb = tensors.pop(EMBEDDING_KEY, None)
    if emb is None:
        problems.append(f"tensor {EMBEDDING_KEY!r} is missing")
    by_set: dict[tuple[str, str], dict[str, list]] = {(h["part"], h["name"]): {} for h in headers}
    replacements, unknown = {}, []
    for key, t in tensors.items():
        if key.startswith("replace."):
            replacements[key[len("replace."):]] = t
            continue
        parts = key.split(".", 3)
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if parts[0] != "lora" or len(parts) < 4 or suffix is None or (parts[1], parts[2]) not in by_set:
            unknown.append(key)
            continue
        module = parts[3][: -len(suffix)]
        by_set[(parts[1], parts[2])].setdefault(module, [None, None])[LORA_SUFFIXES.index(suffix)] = t
    if unknown:
        problems.append(f"{len(unknown)} unexpected tensor(s), e.g. {', '.join(sorted(unknown)[:3])}")
    sets = []
    for h in headers:
        mods = by_set[(h["part"], h["name"])]
        half = [m for m, ab in mods.items() if None in ab]
        if half:
            problems.append(f"set {h['part']}.{h['name']}: {len(half)} module(s) with only one factor, e.g. {half[0]}")
        try:
            sets.append(LoraSet(part=h["part"], name=h["name"], rank=h["rank"], alpha=h["alpha"],
                                group=h["group"], factors={m: (ab[0], ab[1]) for m, ab in mods.items()}))
        except DfosdError as exc:
            problems.append(exc.message)
    if problems:
        raise problems_error(f"model file {path}", problems, hint="re-create it with `dfosd convert`")
    return SRModel(family=family, base_model=meta["base_model"], lora_sets=tuple(sets), replacements=replacements,
                   text_embedding=emb, timestep=timestep, x0_rule=meta["x0_rule"], preprocess=meta["preprocess"],
                   color_fix=meta["color_fix"], upscale=upscale, prompt=prompt, source=source, path=path,
                   sha256=sha256)


def _set_headers(headers) -> list[dict]:
    """The ``lora_sets`` header, checked: a list of {part, name, rank, alpha[, group]} with a
    positive integer rank and a number alpha (ValueError naming the first bad entry)."""
    if not isinstance(headers, list):
        raise ValueError(f"lora_sets is a JSON {type(headers).__name__}, expected a list of LoRA set records")
    out = []
    for i, h in enumerate(headers):
        ok = isinstance(h, dict) and isinstance(h.get("part"), str) and isinstance(h.get("name"), str) \
            and isinstance(h.get("group", "main"), str) and isinstance(h.get("rank"), int) \
            and not isinstance(h.get("rank"), bool) and isinstance(h.get("alpha"), (int, float)) \
            and not isinstance(h.get("alpha"), bool)
        if not ok:
            raise ValueError(f"lora_sets[{i}] = {h!r} is not a record of part, name (strings), rank (an integer) "
                             "and alpha (a number)")
        out.append({**h, "alpha": float(h["alpha"]), "group": h.get("group", "main")})
    return out


def _not_float(tensors: Mapping[str, "torch.Tensor"]) -> list[str]:
    return sorted(k for k, t in tensors.items() if not t.is_floating_point())


def validate_model(model: SRModel, base: "Base") -> None:
    """Every problem between the model and the base, in one error, before any work."""

    problems: list[str] = []
    roots = {"unet": base.unet, "vae": base.vae}
    modules = {part: dict(root.named_modules()) for part, root in roots.items()}
    for s in model.lora_sets:
        for name, (a, b) in sorted(s.factors.items()):
            problem = lora_fit_problem(modules[s.part].get(name), a, b, s.rank, s.part)
            if problem:
                problems.append(f"{s.part}.{s.name}: {name}: {problem}")
    for key, t in model.replacements.items():
        part, _, pname = key.partition(".")
        params = dict(roots[part].named_parameters()) if part in roots else {}
        if pname not in params:
            problems.append(f"replacement {key}: no such parameter in the base")
        elif tuple(params[pname].shape) != tuple(t.shape):
            problems.append(f"replacement {key}: shape {tuple(t.shape)}, the base has {tuple(params[pname].shape)}")
    tensors = {f"{s.part}.{s.name}: {name}.lora_{ab}": t for s in model.lora_sets
               for name, pair in s.factors.items() for ab, t in zip("AB", pair) if t is not None}
    tensors.update({f"replacement {k}": t for k, t in model.replacements.items()})
    if model.text_embedding is not None:
        tensors["text_embedding"] = model.text_embedding
    from dfosd.core.checkpoint import non_finite_names

    integral = _not_float(tensors)
    if integral:  # an integer embedding or factor is not a trained weight (and would be cast silently)
        problems.append(f"{len(integral)} tensor(s) are not floating point: {some_names(integral)}")
    nonfinite = non_finite_names(tensors)
    if nonfinite:  # a diverged training run: export and run would succeed with every output pixel 0
        problems.append(f"{len(nonfinite)} tensor(s) hold NaN or Inf values: {some_names(nonfinite)}")
    emb, width = model.text_embedding, base.cross_attention_dim
    if emb is None or emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[2] != width or not 1 <= emb.shape[1] <= MAX_TOKENS:
        problems.append(f"text_embedding has shape {None if emb is None else tuple(emb.shape)}; expected "
                        f"[1, N<={MAX_TOKENS}, {width}] (the base UNet's cross_attention_dim is {width})")
    if problems:
        where = model.path or model.source.get("file") or "model"
        raise problems_error(f"{where} ({model.family.name}) does not fit base {base.spec}", problems,
                             hint="pass the --base the checkpoint was trained on (SD-2.1-base for these families)")


def merge_into(model: SRModel, unet, vae, *, groups: Mapping[str, float] | None = None) -> None:
    """Replace whole layers, then W += weight(group) * (alpha / rank) * B @ A, in place, in fp32.

    ``groups`` weighs each LoRA group (PiSA-SR's pix/sem); default 1 for every group. ``vae``
    None: the UNet only (sets on the VAE are skipped).
    """
    import torch

    roots = {"unet": unet, "vae": vae}
    overflow = []
    with torch.no_grad():
        for key, t in model.replacements.items():
            if roots[key.partition(".")[0]] is None:
                continue
            part, _, pname = key.partition(".")
            p = dict(roots[part].named_parameters())[pname]
            p.copy_(t.to(p.dtype))
        for s in model.lora_sets:
            weight = 1.0 if groups is None else float(groups.get(s.group, 1.0))
            if weight == 0.0 or roots[s.part] is None:
                continue
            modules = dict(roots[s.part].named_modules())
            for name, (a, b) in s.factors.items():
                if not merge_lora_factors(modules[name].weight, a, b, weight * s.scale):
                    overflow.append(f"{s.part}.{name}.weight")
    if overflow:

        raise DfosdError(f"{model.path or model.source.get('file') or 'model'}: merging the LoRA gives NaN or Inf in "
                         f"{len(overflow)} weight(s): {some_names(overflow)} (every output pixel would be 0)",
                         hint="the LoRA factors are too large for the base's precision; check the training run")
