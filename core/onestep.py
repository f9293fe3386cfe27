"""The one definition of DFOSD's single step, split into the three deployable parts.

uint8 LR [B,3,h,w]
  -> EncoderPart:   bicubic x4 (a=-0.75, half-pixel, no antialias) -> [-1,1] -> VAE encoder
                    posterior mean * scaling_factor                     -> latent  fp32
  -> DenoiserPart:  UNet(latent, T, learned embedding) = eps;
                    x0 = (z - sqrt(1-abar_T) * eps) / sqrt(abar_T) in fp32 -> denoised fp32
  -> DecoderPart:   VAE decoder(z / scaling_factor) -> clamp -> uint8    -> SR [B,3,4h,4w]

Other families (core/families.py: OSEDiff, PiSA-SR, HYPIR) change only declared pieces:
the pre-processing (PIL's bicubic on the uint8 image, or torch's without the clamp), the
x0 rule (x0 = z - eps for PiSA-SR), the timestep, LoRA merged into the VAE encoder too,
and PiSA-SR's optional two-pass UNet; ``build_from_model`` builds any of them.

Export traces exactly these modules, the benchmarks run them as "eager PyTorch", and
training calls their float paths (``encode_float``, ``denoise``, ``decode_float``), so
there is no second copy of the model to drift. Part boundaries are fp32 in every
precision; fp16 lives inside each part, with fp32 islands where the notes say it must
(pre/post-processing and the x0 step, which multiplies UNet error by 1/sqrt(abar_T)).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS

if TYPE_CHECKING:
    from dfosd.core.bases import Base
    from dfosd.core.srmodel import SRModel


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """abar_t for every training timestep, float64, from a diffusers scheduler config."""
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    b0 = float(scheduler_config.get("beta_start", 0.00085))
    b1 = float(scheduler_config.get("beta_end", 0.012))
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    else:
        raise DfosdError(f"unsupported beta_schedule {kind!r} in the base's scheduler config",
                         hint="DFOSD's one step is defined for SD-2.1-base's scaled_linear schedule")
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise DfosdError("the base's scheduler predicts "
                         f"{scheduler_config.get('prediction_type')!r}; DFOSD needs an epsilon-prediction base "
                         "(SD-2.1-base, not the 768-v model)")
    return torch.cumprod(1.0 - betas, dim=0)


def bicubic_upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """torch's bicubic: a=-0.75, half-pixel centres (align_corners=False), no antialias.

    A constant scale factor (not a size computed from ``x.shape``, which tracing records as
    Shape ops) keeps the exported Resize and everything after it statically shaped.
    """
    return F.interpolate(x, scale_factor=float(scale), mode="bicubic", align_corners=False)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1,1] float -> uint8 with round-half-to-even, as Round/Clip/Cast in ONNX."""
    return torch.round((image.float() + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)


class EncoderPart(nn.Module):
    """uint8 LR -> scaled posterior-mean latent (fp32)."""

    #: submodules that are "the network" (fp16 in an fp16 export); everything else is fp32 glue
    NETWORK_SCOPES = ("encoder", "quant_conv")

    def __init__(self, vae, *, scale: int, scaling_factor: float, dtype: torch.dtype = torch.float32,
                 preprocess: str = "torch-bicubic"):
        super().__init__()
        self.preprocess = preprocess  # one of families.PREPROCESSINGS
        self.encoder = vae.encoder
        self.quant_conv = getattr(vae, "quant_conv", None)  # None when the config disables it
        self.scale = int(scale)
        self.scaling_factor = float(scaling_factor)
        self.dtype = dtype

    def encode_float(self, image: torch.Tensor) -> torch.Tensor:
        """[-1,1] image at output resolution -> latent (fp32). Used by training too."""
        h = self.encoder(image.to(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h[:, : h.shape[1] // 2]  # posterior mean: the deterministic choice
        return mean.float() * self.scaling_factor

    def upsample_lr(self, lr01: torch.Tensor) -> torch.Tensor:
        """[0,1] LR float -> [-1,1] bicubic-upsampled image (fp32, clamped like a saved image)."""
        return (bicubic_upscale(lr01.float(), self.scale) * 2.0 - 1.0).clamp(-1.0, 1.0)

    def preprocess_uint8(self, lr_image: torch.Tensor) -> torch.Tensor:
        """uint8 LR -> the [-1,1] encoder input, the way the model's family does it upstream."""
        if self.preprocess == "torch-bicubic":
            return self.upsample_lr(lr_image.float() / 255.0)
        if self.preprocess == "torch-bicubic-unclamped":  # HYPIR: F.interpolate on [0,1], no clamp
            return bicubic_upscale(lr_image.float() / 255.0, self.scale) * 2.0 - 1.0
        if self.preprocess == "pil-bicubic":  # OSEDiff/PiSA-SR: PIL resize x4 of the uint8 image
            from dfosd.core.resample import pil_bicubic_upscale

            return pil_bicubic_upscale(lr_image.float(), self.scale) / 127.5 - 1.0
        raise DfosdError(f"unknown pre-processing {self.preprocess!r}")

    def forward(self, lr_image: torch.Tensor) -> torch.Tensor:
        return self.encode_float(self.preprocess_uint8(lr_image))


class DenoiserPart(nn.Module):
    """UNet at the fixed timestep with the learned embedding, then the x0 step in fp32."""

    NETWORK_SCOPES = ("unet",)

    def __init__(self, unet, text_embedding: torch.Tensor, *, timestep: int, alpha_bar: float,
                 dtype: torch.dtype = torch.float32, x0_rule: str = "ddpm"):
        super().__init__()
        self.unet = unet
        self.register_buffer("text_embedding", text_embedding.detach().to(dtype), persistent=False)
        self.timestep = int(timestep)
        # x0 = (z - c_eps * eps) / c_z: DDPM's rule at T, or PiSA-SR's x0 = z - eps
        ddpm = x0_rule == "ddpm"
        self.sqrt_ab = math.sqrt(alpha_bar) if ddpm else 1.0
        self.sqrt_1mab = math.sqrt(1.0 - alpha_bar) if ddpm else 1.0
        self.dtype = dtype

    def _eps(self, unet, latent: torch.Tensor, embedding: torch.Tensor | None) -> torch.Tensor:
        """One UNet call at the fixed timestep, conditioned on ``embedding`` (default: the baked one)."""
        emb = self.text_embedding if embedding is None else embedding.to(self.dtype)
        emb = emb.expand(latent.shape[0], -1, -1)
        t = torch.full((latent.shape[0],), self.timestep, dtype=torch.int64, device=latent.device)
        return unet(latent.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()

    def predict_noise(self, latent: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self._eps(self.unet, latent, embedding)

    def denoise(self, latent: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        eps = self.predict_noise(latent, embedding)
        return (latent.float() - self.sqrt_1mab * eps) / self.sqrt_ab

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.denoise(latent)


class TwoPassDenoiserPart(DenoiserPart):
    """PiSA-SR's adjustable mode: two weight sets in one part, two UNet calls,
    eps = l_pix * eps_pix + l_sem * (eps_pix+sem - eps_pix), then the x0 step (fp32)."""

    NETWORK_SCOPES = ("unet", "unet_pix")

    def __init__(self, unet_full, unet_pix, text_embedding: torch.Tensor, *, scales: tuple[float, float], **kw):
        super().__init__(unet_full, text_embedding, **kw)
        self.unet_pix = unet_pix
        self.lambda_pix, self.lambda_sem = (float(v) for v in scales)

    def predict_noise(self, latent: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        eps_full = self._eps(self.unet, latent, embedding)
        eps_pix = self._eps(self.unet_pix, latent, embedding)
        return self.lambda_pix * eps_pix + self.lambda_sem * (eps_full - eps_pix)


class DecoderPart(nn.Module):
    """Denoised latent (fp32) -> uint8 SR image."""

    NETWORK_SCOPES = ("decoder", "post_quant_conv")

    def __init__(self, vae, *, scaling_factor: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.decoder = vae.decoder
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.scaling_factor = float(scaling_factor)
        self.dtype = dtype

    def decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        """latent -> the VAE decoder's image (fp32, not clamped: NaN/Inf still visible)."""
        z = (latent.float() / self.scaling_factor).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()

    def decode_float(self, latent: torch.Tensor) -> torch.Tensor:
        """latent -> [-1,1] image (fp32, clamped). Used by training too."""
        return self.decode_raw(latent).clamp(-1.0, 1.0)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image, uint8 [B] flag: 1 where any value before the cast was NaN or Inf).

        The flag is computed on the decoder's raw output, before the clamp and the cast that
        would turn a NaN into a byte (core/vocab.py SR_NONFINITE)."""
        raw = self.decode_raw(latent)
        # IsNaN and |x| > max, not torch.isfinite: that traces to a Cast to float64 (for IsInf),
        # a type TensorRT does not have; the max over float keeps int64 out of the graph too.
        bad = torch.isnan(raw) | (raw.abs() > torch.finfo(torch.float32).max)
        flag = bad.flatten(1).to(torch.float32).amax(dim=1).to(torch.uint8)
        return to_uint8(raw.clamp(-1.0, 1.0)), flag


class OneStepSR(nn.Module):
    """The whole single step, eager: uint8 [B,3,h,w] -> uint8 [B,3,s*h,s*w]."""

    def __init__(self, encoder: EncoderPart, denoiser: DenoiserPart, decoder: DecoderPart):
        super().__init__()
        self.encoder = encoder
        self.unet = denoiser
        self.decoder = decoder

    def part(self, name: str) -> nn.Module:
        if name not in COMPONENTS:
            raise KeyError(name)
        return getattr(self, name)

    def sr_float(self, lr01: torch.Tensor) -> torch.Tensor:
        """[0,1] LR float -> [-1,1] SR float: the differentiable path training uses."""
        latent = self.encoder.encode_float(self.encoder.upsample_lr(lr01))
        return self.decoder.decode_float(self.unet.denoise(latent))

    @torch.no_grad()
    def forward(self, lr_image: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.unet(self.encoder(lr_image)))[0]


def build_from_model(base: "Base", model: "SRModel", *, dtype: torch.dtype = torch.float32, copy: bool = True,
                     groups: dict[str, float] | None = None,
                     pisa_scales: tuple[float, float] | None = None) -> OneStepSR:
    """Eager one-step model of any family: layers replaced and LoRA merged into the UNet and
    the VAE (copies unless ``copy=False``, for callers that own the base and need the memory).

    ``pisa_scales`` (lambda_pix, lambda_sem): PiSA-SR's two-pass UNet (a second UNet copy
    holding only the pix set)."""
    import copy as copy_

    from dfosd.core.srmodel import merge_into, validate_model

    validate_model(model, base)
    unet_pix = None
    if pisa_scales is not None:
        groups_present = {s.group for s in model.lora_sets}
        if model.family.name != "pisa-sr" or groups_present != {"pix", "sem"}:
            raise DfosdError(f"--pisa-scales applies to PiSA-SR checkpoints (pix and sem LoRA sets); this is "
                             f"{model.family.name} with groups {sorted(groups_present)}")
        unet_pix = copy_.deepcopy(base.unet)  # before the base's own UNet is merged in place
        merge_into(model, unet_pix, None, groups={"pix": 1.0, "sem": 0.0})
        unet_pix = unet_pix.to(dtype).eval()
    unet = copy_.deepcopy(base.unet) if copy else base.unet
    vae = copy_.deepcopy(base.vae) if copy else base.vae
    merge_into(model, unet, vae, groups=groups)
    unet, vae = unet.to(dtype).eval(), vae.to(dtype).eval()
    abar = float(alphas_cumprod(base.scheduler_config)[model.timestep])
    sf = base.scaling_factor
    step = dict(timestep=model.timestep, alpha_bar=abar, dtype=dtype, x0_rule=model.x0_rule)
    denoiser = DenoiserPart(unet, model.text_embedding, **step) if unet_pix is None else \
        TwoPassDenoiserPart(unet, unet_pix, model.text_embedding, scales=pisa_scales, **step)
    return OneStepSR(
        EncoderPart(vae, scale=model.upscale, scaling_factor=sf, dtype=dtype, preprocess=model.preprocess),
        denoiser,
        DecoderPart(vae, scaling_factor=sf, dtype=dtype),
    ).eval()
