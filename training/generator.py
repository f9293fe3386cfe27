"""The trainable DFOSD generator: frozen VAE, frozen UNet + PEFT LoRA, a learned embedding, fixed T.

The forward pass is the deployed single step itself: ``EncoderPart.encode_float`` ->
``DenoiserPart.denoise(embedding=...)`` -> ``DecoderPart.decode_float`` from
``dfosd.core.onestep``, the same modules export traces. Only the LoRA factors (in the UNet)
and the embedding are trained. ``save`` writes them in the checkpoint format
(``dfosd.core.checkpoint``), which ``dfosd-export`` merges into the same UNet weights.

LoRA targets (``DEFAULT_LORA_TARGETS``): attention projections ``to_q``, ``to_k``, ``to_v``,
``to_out.0``; feed-forward ``ff.net.0.proj`` (GEGLU in) and ``ff.net.2`` (out); ResNet convs
``conv1`` and ``conv2``. PEFT matches a target by the module name's last dotted parts, the
rule ``dfosd.core.checkpoint.lora_target_modules`` implements, so the saved module list and
the list validation expects are the same by construction.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from dfosd.core.checkpoint import (
    DEFAULT_LORA_TARGETS,
    MAX_TOKENS,
    CheckpointMetadata,
    lora_target_modules,
    write_checkpoint,
)
from dfosd.core.errors import DfosdError
from dfosd.core.onestep import DecoderPart, DenoiserPart, EncoderPart, alphas_cumprod

SCALE = 4  # DFOSD is a x4 model; the encoder upsamples LR by this before the VAE


class OneStepGenerator(nn.Module):
    """LR [0,1] -> (SR [-1,1], denoised latent), differentiable w.r.t. the LoRA and the embedding."""

    def __init__(self, base, *, rank: int = 16, alpha: float = 16.0, timestep: int = 999,
                 embedding_tokens: int = 77, targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                 gradient_checkpointing: bool = False, embedding_seed: int = 0, copy_unet: bool = True):
        """``copy_unet=False`` injects the LoRA into ``base.unet`` itself (a full-size UNet is 3.5 GB
        in fp32): for callers that own the base. Build the discriminator from the UNet first."""
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        problems = []
        abar = alphas_cumprod(base.scheduler_config)
        if not 0 <= timestep < abar.numel():
            problems.append(f"timestep {timestep} is outside the base scheduler's [0, {abar.numel() - 1}]")
        if not 1 <= embedding_tokens <= MAX_TOKENS:
            problems.append(f"embedding_tokens {embedding_tokens} is outside [1, {MAX_TOKENS}]")
        if problems:
            raise DfosdError("cannot build the generator: " + "; ".join(problems))
        self.base_model = base.spec
        self.rank, self.alpha, self.timestep = int(rank), float(alpha), int(timestep)
        self.targets = tuple(targets)

        unet = copy.deepcopy(base.unet) if copy_unet else base.unet
        vae = base.vae
        vae.requires_grad_(False)
        unet.requires_grad_(False)
        self.lora_modules = lora_target_modules(unet, self.targets)
        if not self.lora_modules:
            raise DfosdError(f"no LoRA target {self.targets} was found in the base UNet")
        # PEFT's default init: A random, B zero, so training starts exactly at the base one-step model
        inject_adapter_in_model(LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                                           init_lora_weights=True), unet)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            vae.enable_gradient_checkpointing()  # the decoder at full resolution holds most activations

        # The learned conditioning replaces CLIP. Unit-variance init: the scale of the layer-normed
        # text-encoder states the UNet was trained on (the exact DFOSD init is not public).
        width = int(unet.config.cross_attention_dim)
        g = torch.Generator().manual_seed(embedding_seed)
        self.embedding = nn.Parameter(torch.randn(1, int(embedding_tokens), width, generator=g))

        sf = base.scaling_factor
        self.encoder = EncoderPart(vae, scale=SCALE, scaling_factor=sf)
        self.denoiser = DenoiserPart(unet, self.embedding, timestep=self.timestep,
                                     alpha_bar=float(abar[self.timestep]))
        self.decoder = DecoderPart(vae, scaling_factor=sf)

    # ------------------------------------------------------------ the step

    @property
    def unet(self):
        return self.denoiser.unet

    @torch.no_grad()
    def encode_lr(self, lr01: torch.Tensor) -> torch.Tensor:
        """[0,1] LR -> z_L (the frozen encoder needs no graph)."""
        return self.encoder.encode_float(self.encoder.upsample_lr(lr01))

    @torch.no_grad()
    def encode_hr(self, hr01: torch.Tensor) -> torch.Tensor:
        """[0,1] HR -> z_H = E(x_H): the discriminator's real latents."""
        return self.encoder.encode_float(hr01.float() * 2.0 - 1.0)

    def forward(self, lr01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0,1] LR [B,3,h,w] -> (SR [-1,1] [B,3,4h,4w], denoised latent z_hat)."""
        z_hat = self.denoiser.denoise(self.encode_lr(lr01), embedding=self.embedding)
        return self.decoder.decode_float(z_hat), z_hat

    # ------------------------------------------------------------ trainable state

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The LoRA factors (PEFT names with the adapter) and the embedding: all that training changes."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise DfosdError(f"training state does not fit this generator: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[:2]})",
                             hint="resume with the --base, --rank and --embedding-tokens of the saved run")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """``<module>.lora_A.weight`` / ``lora_B.weight`` (fp32, CPU): the checkpoint's LoRA tensors."""
        from peft.utils import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.unet)
        return {k: v.detach().float().cpu() for k, v in sd.items()}

    def checkpoint_metadata(self, **extra: str) -> CheckpointMetadata:
        return CheckpointMetadata(base_model=self.base_model, timestep=self.timestep, lora_rank=self.rank,
                                  lora_alpha=self.alpha, upscale=SCALE, extra=extra)

    def save(self, path: str | Path, **extra: str) -> Path:
        """Write ``lora.safetensors`` (atomically, via ``write_checkpoint``)."""
        return write_checkpoint(path, lora=self.lora_state_dict(), text_embedding=self.embedding.detach().float(),
                                metadata=self.checkpoint_metadata(**extra))
