"""The ResShift backbone (ResShift, SinSR, TAD-SR): family data, configs, checkpoints, one step.

Not Stable Diffusion: a Swin UNet (core/resshift_unet.py) in the latent of a VQ-f4 autoencoder
(core/resshift_vq.py), residual-shifting diffusion with an eta schedule. One step, as SinSR's
sampler runs it with ``one_step=True`` (wyf0912/SinSR f173549 ``sampler.py`` lines 113-168,
``models/gaussian_diffusion.py`` p_sample_loop_progressive 612-672, prior_sample 705-717,
_scale_input 948-959, encode/decode_first_stage 674-703):

    y   = lr / 255 * 2 - 1                                   (sampler: (im - 0.5) / 0.5)
    z_y = VQ.encode(bicubic x4 of y)                         (torch bicubic, no clamp; no quantization)
    z_T = z_y + kappa * sqrt_eta_T * eps                     (prior_sample at T = steps - 1)
    x0  = UNet(z_T / sqrt(eta_T * kappa^2 + 1), T, lq=y)     (normalize_input with latent_flag; predicts x0)
    sr  = clamp(VQ.decode(x0), -1, 1)                        (decode through the nearest code)

The eta schedule (``get_named_eta_schedule`` "exponential", lines 31-64): eta_start =
min(min_noise / kappa, min_noise, sqrt(0.001)); sqrt_eta_t = eta_start * r ** ((t / (steps-1)) ** power
* (steps-1)) with r = (eta_end / eta_start) ** (1 / (steps-1)); eta_t = sqrt_eta_t².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.resshift_unet import SwinUNet, SwinUNetConfig
from dfosd.core.resshift_vq import VQAutoencoder, VQConfig
from dfosd.core.vocab import RESSHIFT_FAMILY_NAMES


@dataclass(frozen=True)
class EtaSchedule:
    steps: int
    min_noise_level: float
    kappa: float
    power: float
    etas_end: float = 0.99

    def sqrt_etas(self) -> list[float]:
        start = min(self.min_noise_level / self.kappa, self.min_noise_level, math.sqrt(0.001))
        r = math.exp(math.log(self.etas_end / start) / (self.steps - 1))
        return [start * r ** ((t / (self.steps - 1)) ** self.power * (self.steps - 1)) for t in range(self.steps)]


@dataclass(frozen=True)
class ResShiftCheckpoint:
    """A released checkpoint's diffusion facts (its config YAML) and whether it is a one-step model."""

    name: str
    files: tuple[str, ...]
    schedule: EtaSchedule
    one_step: bool
    upstream: str


SINSR_SCHEDULE = EtaSchedule(steps=15, min_noise_level=0.04, kappa=2.0, power=0.3)
CHECKPOINTS = {c.name: c for c in (
    ResShiftCheckpoint("sinsr", ("SinSR_v1.pth", "SinSR_v2.pth"), SINSR_SCHEDULE, True,
                       "wyf0912/SinSR configs/SinSR.yaml (diffusion), inference.py --one_step"),
    ResShiftCheckpoint("tad-sr", ("TAD-SR.pth",), SINSR_SCHEDULE, True,
                       "LearningHx/TAD-SR TAD-SR/configs/TAD-SR.yaml (diffusion), TAD-SR/inference.py --one_step"),
    ResShiftCheckpoint("resshift-s15", ("resshift_realsrx4_s15_v1.pth", "resshift_realsrx4_s15_v2.pth"),
                       SINSR_SCHEDULE, False, "zsyOAOA/ResShift configs/realsr_swinunet_realesrgan256.yaml"),
    ResShiftCheckpoint("resshift-s4", ("resshift_realsrx4_s4_v3.pth",),
                       EtaSchedule(steps=4, min_noise_level=0.2, kappa=2.0, power=0.3), False,
                       "zsyOAOA/ResShift configs/realsr_swinunet_realesrgan256_journal.yaml"),
)}
assert tuple(CHECKPOINTS) == RESSHIFT_FAMILY_NAMES, "core/vocab.py names the ResShift-backbone families"
MULTI_STEP_REASON = ("a multi-step ResShift model ({steps} UNet calls, each followed by the posterior step and "
                     "fresh noise): dfosd compiles one-step models; use a one-step student of it (SinSR, TAD-SR)")

# The released architecture (SinSR configs/SinSR.yaml model/autoencoder params, the same in ResShift's
# realsr_swinunet_realesrgan256*.yaml and TAD-SR.yaml).
RELEASED_UNET = SwinUNetConfig(image_size=64, in_channels=6, model_channels=160, out_channels=3,
                               channel_mult=(1, 2, 2, 4), num_res_blocks=(2, 2, 2, 2),
                               attention_resolutions=(64, 32, 16, 8), swin_heads=6, swin_depth=2,
                               swin_embed_dim=192, window_size=8, mlp_ratio=4.0)
RELEASED_VQ = VQConfig(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=8192)


def unet_config_from_yaml(params: Mapping) -> SwinUNetConfig:
    """``model.params`` of an upstream YAML -> the UNet config (SinSR counts the LR in in_channels;
    ResShift/TAD-SR add it when lq_size == image_size)."""
    problems = []
    if params.get("resblock_updown") or params.get("patch_norm") or not params.get("conv_resample", True):
        problems.append("resblock_updown / patch_norm / conv_resample False are not in the released configs")
    if params.get("dims", 2) != 2:
        problems.append("only 2-D models")
    image = int(params["image_size"])
    in_ch = int(params["in_channels"])
    if "lq_size" in params:  # ResShift's UNetModelSwin: a feature extractor unless the LR is latent-sized
        if int(params["lq_size"]) != image:
            problems.append(f"lq_size {params['lq_size']} != image_size {image}: ResShift's LR feature extractor "
                            "is not supported (the released x4 SR configs use lq_size == image_size)")
        in_ch += 4 if params.get("cond_mask") else 3
    nrb = params["num_res_blocks"]
    mult = tuple(int(m) for m in params["channel_mult"])
    nrb = tuple(int(n) for n in (nrb if isinstance(nrb, (list, tuple)) else [nrb] * len(mult)))
    nhc, embed = int(params.get("num_head_channels", -1)), int(params.get("swin_embed_dim", 96))
    heads = int(params.get("num_heads", 1)) if nhc == -1 else embed // nhc
    if problems:
        raise problems_error("ResShift UNet config", problems)
    return SwinUNetConfig(image_size=image, in_channels=in_ch, model_channels=int(params["model_channels"]),
                          out_channels=int(params["out_channels"]), channel_mult=mult, num_res_blocks=nrb,
                          attention_resolutions=tuple(int(r) for r in params["attention_resolutions"]),
                          swin_heads=heads, swin_depth=int(params.get("swin_depth", 2)), swin_embed_dim=embed,
                          window_size=int(params.get("window_size", 8)), mlp_ratio=float(params.get("mlp_ratio", 2.0)),
                          use_scale_shift_norm=bool(params.get("use_scale_shift_norm", False)))


def vq_config_from_yaml(params: Mapping) -> VQConfig:
    dd = params["ddconfig"]
    if dd.get("attn_resolutions"):
        res, attn_levels = int(dd["resolution"]), []
        for i in range(len(dd["ch_mult"])):
            if res // 2 ** i in dd["attn_resolutions"]:
                attn_levels.append(i)
    else:
        attn_levels = []
    return VQConfig(ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                    num_res_blocks=int(dd["num_res_blocks"]), z_channels=int(dd["z_channels"]),
                    embed_dim=int(params["embed_dim"]), n_embed=int(params["n_embed"]), attn_levels=tuple(attn_levels),
                    in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)))


def schedule_from_yaml(params: Mapping) -> EtaSchedule:
    problems = []
    for key, want in (("schedule_name", "exponential"), ("predict_type", "xstart"), ("normalize_input", True),
                      ("latent_flag", True)):
        if params.get(key, want) != want:
            problems.append(f"{key} {params.get(key)!r}: dfosd compiles {want!r} (the released SR configs)")
    if params.get("timestep_respacing") not in (None, params.get("steps")):
        problems.append("timestep_respacing is not supported")
    if float(params.get("scale_factor", 1.0) or 1.0) != 1.0:
        problems.append("scale_factor other than 1.0 is not supported")
    if problems:
        raise problems_error("ResShift diffusion config", problems)
    return EtaSchedule(steps=int(params["steps"]), min_noise_level=float(params["min_noise_level"]),
                       kappa=float(params["kappa"]), power=float(params["schedule_kwargs"]["power"]),
                       etas_end=float(params.get("etas_end", 0.99)))


def _count(state: Mapping, fmt: str) -> int:
    n = 0
    while any(k.startswith(fmt.format(n)) for k in state):
        n += 1
    return n


def unet_config_from_state(state: Mapping, what: str = "UNet state dict") -> SwinUNetConfig:
    """The architecture from the keys and shapes alone (channels, levels, blocks per level, Swin depth,
    width, heads, window, and image_size from a shifted block's stored mask)."""
    try:
        mc = int(state["time_embed.0.weight"].shape[1])
        mult, nrb, swin_levels, level, k = [], [0], [], 0, 1
        while f"input_blocks.{k}.0.op.weight" in state or f"input_blocks.{k}.0.in_layers.2.weight" in state:
            if f"input_blocks.{k}.0.op.weight" in state:
                level += 1
                nrb.append(0)
            else:
                out_ch = int(state[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0])
                if nrb[level] == 0:
                    mult.append(out_ch // mc)
                    if f"input_blocks.{k}.1.patch_embed.proj.weight" in state:
                        swin_levels.append(level)
                nrb[level] += 1
            k += 1
        first = "middle_block.1."
        embed = int(state[first + "patch_embed.proj.weight"].shape[0])
        depth = _count(state, first + "blocks.{}.norm1.weight")
        heads = int(state[first + "blocks.0.attn.relative_position_bias_table"].shape[1])
        mlp_ratio = state[first + "blocks.0.mlp.fc1.weight"].shape[0] / embed
        windows, image_size = {}, None
        prefixes = [f"input_blocks.{i}.1." for i in range(k)] + [first]
        for p in prefixes:
            rows = state.get(p + "blocks.0.attn.relative_position_bias_table")
            if rows is not None:
                windows[p] = (math.isqrt(int(rows.shape[0])) + 1) // 2
            mask = state.get(p + "blocks.1.attn_mask")
            if mask is not None and image_size is None:
                lvl = len(mult) - 1 if p == first else _level_of(state, k, int(p.split(".")[1]))
                image_size = windows[p] * math.isqrt(int(mask.shape[0])) * 2 ** lvl
        window = max(windows.values())
        image_size = image_size or window  # no shifted block: every level at or below the window
        scale_shift = state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == \
            2 * state["input_blocks.1.0.in_layers.2.weight"].shape[0]
        cfg = SwinUNetConfig(image_size=image_size, in_channels=int(state["input_blocks.0.0.weight"].shape[1]),
                             model_channels=mc, out_channels=int(state["out.2.weight"].shape[0]),
                             channel_mult=tuple(mult), num_res_blocks=tuple(nrb),
                             attention_resolutions=tuple(image_size // 2 ** lv for lv in swin_levels),
                             swin_heads=heads, swin_depth=depth, swin_embed_dim=embed, window_size=window,
                             mlp_ratio=float(mlp_ratio), use_scale_shift_norm=bool(scale_shift))
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise DfosdError(f"{what}: the keys do not describe ResShift's UNetModelSwin ({type(exc).__name__}: {exc})",
                         hint="pass upstream's config YAML with --config") from None
    return cfg


def _level_of(state: Mapping, blocks: int, index: int) -> int:
    return sum(1 for i in range(1, index) if f"input_blocks.{i}.0.op.weight" in state)


def vq_config_from_state(state: Mapping, what: str = "autoencoder state dict") -> VQConfig:
    try:
        ch = int(state["encoder.conv_in.weight"].shape[0])
        levels = _count(state, "encoder.down.{}.block.0.")
        return VQConfig(ch=ch, ch_mult=tuple(int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch
                                             for i in range(levels)),
                        num_res_blocks=_count(state, "encoder.down.0.block.{}."),
                        z_channels=int(state["encoder.conv_out.weight"].shape[0]),
                        embed_dim=int(state["quant_conv.weight"].shape[0]),
                        n_embed=int(state["quantize.embedding.weight"].shape[0]),
                        attn_levels=tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state),
                        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
                        out_ch=int(state["decoder.conv_out.weight"].shape[0]))
    except (KeyError, IndexError) as exc:
        raise DfosdError(f"{what}: the keys do not describe the VQ-f4 autoencoder (VQModelTorch) ({exc})",
                         hint="pass autoencoder_vq_f4.pth (ResShift's release) with --vq") from None


def read_config(path) -> tuple[SwinUNetConfig, VQConfig, EtaSchedule]:
    """An upstream config YAML (SinSR.yaml, realsr_swinunet_realesrgan256*.yaml, TAD-SR.yaml) -> its
    UNet, autoencoder and schedule. OmegaConf ``${a.b}`` references are resolved (ResShift uses them)."""
    import re

    import yaml

    try:
        root = yaml.safe_load(open(path))
        ref = re.compile(r"^\$\{([\w.]+)\}$")

        def resolve(node):
            if isinstance(node, dict):
                return {k: resolve(v) for k, v in node.items()}
            if isinstance(node, list):
                return [resolve(v) for v in node]
            m = ref.match(node) if isinstance(node, str) else None
            if m:
                target = root
                for part in m[1].split("."):
                    target = target[part]
                return resolve(target)
            return node

        root = resolve(root)
        return (unet_config_from_yaml(root["model"]["params"]), vq_config_from_yaml(root["autoencoder"]["params"]),
                schedule_from_yaml(root["diffusion"]["params"]))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise DfosdError(f"config {path}: not a ResShift/SinSR config YAML ({type(exc).__name__}: {exc})",
                         hint="pass the YAML the checkpoint was released with, e.g. SinSR's configs/SinSR.yaml") from None


def unwrap_state(raw: Mapping, what: str) -> dict:
    """Upstream's loader (sampler.py load_model + utils/util_net.py reload_model): a ``state_dict`` key
    when present, then a ``module.`` prefix (DataParallel, or an EMA file saved from it) stripped."""
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else raw
    if not isinstance(state, Mapping) or not state:
        raise DfosdError(f"{what}: not a state dict (nor a dict with 'state_dict')")
    keys = list(state)
    if keys[0].startswith("module."):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return dict(state)


def load_strict(module: nn.Module, state: Mapping, what: str) -> None:
    """load_state_dict(strict) with the problems as one user error (the derived buffers included)."""
    own = module.state_dict()
    problems = []
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
    shaped = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if shaped:
        k = sorted(shaped)[0]
        problems.append(f"{len(shaped)} tensor(s) of another shape, e.g. {k} {tuple(state[k].shape)} "
                        f"(the architecture has {tuple(own[k].shape)})")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        problems.append(f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {bad[0]}")
    if problems:
        raise problems_error(what, problems)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


class ResShiftOneStep(nn.Module):
    """uint8 LR [B, 3, h, w] + noise [B, 3, h, w] -> float SR in [-1, 1], [B, 3, 4h, 4w] (eager reference)."""

    def __init__(self, unet: SwinUNet, vq: VQAutoencoder, schedule: EtaSchedule, upscale: int = 4):
        super().__init__()
        self.unet, self.vq, self.schedule, self.upscale = unet, vq, schedule, upscale
        t = schedule.steps - 1
        sqrt_eta = schedule.sqrt_etas()[t]
        self.timestep = t
        self.noise_scale = schedule.kappa * sqrt_eta
        self.input_scale = 1.0 / math.sqrt(sqrt_eta ** 2 * schedule.kappa ** 2 + 1)

    def lr_to_unit(self, lr: torch.Tensor) -> torch.Tensor:
        return (lr.float() / 255.0 - 0.5) / 0.5

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(F.interpolate(y, scale_factor=self.upscale, mode="bicubic"))

    def denoise(self, z_y: torch.Tensor, noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z_t = z_y + self.noise_scale * noise
        t = torch.full((z_y.shape[0],), self.timestep, dtype=torch.int64)
        return self.unet(z_t * self.input_scale, t, y)

    def forward(self, lr: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        y = self.lr_to_unit(lr)
        return self.vq.decode(self.denoise(self.encode(y), noise, y)).clamp(-1, 1)
