"""ResShift's one step as three deployable parts (encoder, unet, decoder) and their contracts.

The same chain as the SD families (uint8 in, uint8 out, fp32 latents at the borders), with the
differences the backbone brings: the latent has 3 channels at the LR tile's own size (VQ-f4 of the
x4 image), the UNet part also takes the LR tile (upstream concatenates it to the latent) and the
noise field ε (an input, so overlapping tiles can be fed slices of one whole-image field), and the
decoder looks up the nearest code in fp32 (an fp16 distance could pick another code).
Tile sizes: the latent tile is the LR tile, and it must be a multiple of the UNet's
``tile_multiple`` (every level's size a multiple of its Swin window).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dfosd.core.contracts import ComponentContract, TensorSpec
from dfosd.core.errors import DfosdError
from dfosd.core.onestep import bicubic_upscale, to_uint8
from dfosd.core.resshift import ResShiftOneStep
from dfosd.core.vocab import DENOISED, LATENT, LR_IMAGE, SR_IMAGE

NOISE = "noise"  # the ResShift UNet part's extra input: ε, [B, latent channels, tile, tile] float32


def check_tile(model: ResShiftOneStep, tile: int) -> None:
    need = model.unet.cfg.tile_multiple
    if tile < need or tile % need:
        raise DfosdError(f"tile {tile}: a ResShift UNet tile must be a multiple of {need} (Swin window "
                         f"{model.unet.cfg.window_size} x 2^{len(model.unet.cfg.channel_mult) - 1} downsamplings; "
                         "the windows and their shift mask are constants of the exported size)",
                         hint=f"use --tile {max(need, tile // need * need)}")


def lr_to_unit(lr_image: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] (SinSR's sampler: (im / 255 - 0.5) / 0.5)."""
    return (lr_image.float() / 255.0 - 0.5) / 0.5


class ResShiftEncoderPart(nn.Module):
    """uint8 LR -> z_y = VQ.encode(bicubic x4 of the LR in [-1, 1]) (fp32)."""

    NETWORK_SCOPES = ("encoder", "quant_conv")

    def __init__(self, model: ResShiftOneStep):
        super().__init__()
        self.encoder, self.quant_conv, self.upscale = model.vq.encoder, model.vq.quant_conv, model.upscale

    def forward(self, lr_image):
        return self.quant_conv(self.encoder(bicubic_upscale(lr_to_unit(lr_image), self.upscale))).float()


class ResShiftUNetPart(nn.Module):
    """(z_y, ε, uint8 LR) -> x0: the prior sample at T, the input normalisation, the UNet at T."""

    NETWORK_SCOPES = ("unet",)

    def __init__(self, model: ResShiftOneStep):
        super().__init__()
        self.unet = model.unet
        self.noise_scale, self.input_scale, self.timestep = model.noise_scale, model.input_scale, model.timestep

    def forward(self, latent, noise, lr_image):
        z_t = latent + self.noise_scale * noise
        t = torch.full((latent.shape[0],), self.timestep, dtype=torch.int64)
        return self.unet(z_t * self.input_scale, t, lr_to_unit(lr_image)).float()


class ResShiftDecoderPart(nn.Module):
    """x0 -> nearest codes (fp32) -> VQ decoder -> clamp -> uint8."""

    NETWORK_SCOPES = ("post_quant_conv", "decoder")

    def __init__(self, model: ResShiftOneStep):
        super().__init__()
        self.quantize, self.post_quant_conv, self.decoder = model.vq.quantize, model.vq.post_quant_conv, model.vq.decoder

    def forward(self, denoised_latent):
        image = self.decoder(self.post_quant_conv(self.quantize(denoised_latent.float())))
        return to_uint8(image.float().clamp(-1, 1))


def resshift_parts(model: ResShiftOneStep) -> dict[str, nn.Module]:
    return {"encoder": ResShiftEncoderPart(model), "unet": ResShiftUNetPart(model),
            "decoder": ResShiftDecoderPart(model)}


def resshift_contracts(tile: int, batch: int = 1, channels: int = 3, upscale: int = 4) -> dict[str, ComponentContract]:
    b, s = batch, tile * upscale
    lr = TensorSpec(LR_IMAGE, "uint8", (b, 3, tile, tile))
    lat = TensorSpec(LATENT, "float32", (b, channels, tile, tile))
    noise = TensorSpec(NOISE, "float32", (b, channels, tile, tile))
    den = TensorSpec(DENOISED, "float32", (b, channels, tile, tile))
    return {"encoder": ComponentContract("encoder", b, (lr,), (lat,)),
            "unet": ComponentContract("unet", b, (lat, noise, lr), (den,)),
            "decoder": ComponentContract("decoder", b, (den,), (TensorSpec(SR_IMAGE, "uint8", (b, 3, s, s)),))}
