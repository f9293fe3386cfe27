"""DFOSD's noise-aware discriminator (NAD).

A copy of the base UNet's encoder half (conv_in, time embedding, down blocks, mid block),
frozen, with PEFT LoRA on its attention / feed-forward / ResNet convs, and a randomly
initialised 1x1-conv MLP head giving one realism logit per position of the mid-block map.
Its input is a latent forward-diffused to a random timestep:
F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps, t ~ U{0..t_max}, so it judges real
(E(x_H)) and generated latents under the diffusion prior's own noise levels.

Conditioning: a fixed embedding [1, tokens, cross_attention_dim] (learned by default,
zero-initialised; ``learn_embedding=False`` keeps it zero).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from dfosd.core.checkpoint import DEFAULT_LORA_TARGETS
from dfosd.core.errors import DfosdError


class NoiseAwareDiscriminator(nn.Module):
    def __init__(self, unet, text_embedding_dim: int | None = None, lora_rank: int = 16, lora_alpha: float = 16.0,
                 alphas_cumprod: torch.Tensor | Sequence[float] | None = None, *, embedding_tokens: int = 1,
                 learn_embedding: bool = True, head_hidden: int | None = None,
                 lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS, t_max: int | None = None):
        super().__init__()
        from peft import LoraConfig, inject_adapter_in_model

        cfg = unet.config
        problems = []
        for attr in ("class_embedding", "add_embedding", "encoder_hid_proj"):
            if getattr(unet, attr, None) is not None:
                problems.append(f"the UNet has a {attr}")
        if problems:
            raise DfosdError("the noise-aware discriminator supports SD-style UNets only: " + "; ".join(problems))
        cross_dim = int(cfg.cross_attention_dim)
        if text_embedding_dim is None:
            text_embedding_dim = cross_dim
        if int(text_embedding_dim) != cross_dim:
            raise DfosdError(f"text_embedding_dim {text_embedding_dim} does not match the UNet's "
                             f"cross_attention_dim {cross_dim}")
        if alphas_cumprod is None:
            raise ValueError("alphas_cumprod is required (dfosd.core.onestep.alphas_cumprod(scheduler_config))")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 1 or not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must be a non-empty vector in (0, 1]")
        self.t_max = abar.numel() - 1 if t_max is None else int(t_max)
        if not 0 <= self.t_max < abar.numel():
            raise ValueError(f"t_max {t_max} is outside [0, {abar.numel() - 1}]")

        # the frozen trunk: deep copies, so the generator's UNet is untouched
        trunk = nn.Module()
        trunk.conv_in = copy.deepcopy(unet.conv_in)
        trunk.time_proj = copy.deepcopy(unet.time_proj)
        trunk.time_embedding = copy.deepcopy(unet.time_embedding)
        trunk.time_embed_act = copy.deepcopy(getattr(unet, "time_embed_act", None))
        trunk.down_blocks = copy.deepcopy(unet.down_blocks)
        trunk.mid_block = copy.deepcopy(unet.mid_block)
        trunk.requires_grad_(False)
        self.lora_rank, self.lora_alpha = int(lora_rank), float(lora_alpha)
        self.lora_targets = tuple(lora_targets)
        try:
            trunk = inject_adapter_in_model(
                LoraConfig(r=self.lora_rank, lora_alpha=self.lora_alpha, target_modules=list(self.lora_targets),
                           init_lora_weights=True), trunk)
        except ValueError as e:  # peft's NoMatchingPeftModuleError
            raise DfosdError(f"no LoRA target {self.lora_targets} was found in the UNet's down/mid blocks: {e}") from e
        for name, p in trunk.named_parameters():
            p.requires_grad_("lora_" in name)
        if not any(p.requires_grad for p in trunk.parameters()):
            raise DfosdError(f"no LoRA target {self.lora_targets} was found in the UNet's down/mid blocks")
        self.trunk = trunk

        dtype = next(unet.parameters()).dtype
        emb = torch.zeros(1, int(embedding_tokens), cross_dim, dtype=dtype)
        if learn_embedding:
            self.embedding = nn.Parameter(emb)
        else:
            self.register_buffer("embedding", emb)
        c = int(cfg.block_out_channels[-1])
        h = int(head_hidden or c)
        self.head = nn.Sequential(nn.Conv2d(c, h, 1), nn.SiLU(), nn.Conv2d(h, h, 1), nn.SiLU(), nn.Conv2d(h, 1, 1))
        self.head.to(dtype)
        self.register_buffer("alphas_cumprod", abar.float(), persistent=False)

    # ------------------------------------------------------------ pieces

    def draw_timesteps(self, n: int, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> torch.Tensor:
        """n integer timesteps, uniform on {0..t_max}, drawn from ``generator`` (or the global RNG)."""
        gdev = generator.device if generator is not None else (device or self.alphas_cumprod.device)
        t = torch.randint(0, self.t_max + 1, (n,), generator=generator, device=gdev)
        return t.to(device or self.alphas_cumprod.device)

    def diffuse(self, z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) noise, in fp32."""
        ab = self.alphas_cumprod.float().to(z.device)[t.to(z.device).long()].view(-1, 1, 1, 1)
        return ab.sqrt() * z.float() + (1.0 - ab).sqrt() * noise.float()

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The down + mid path of the UNet at timestep t: [B, C_mid, h, w]."""
        tr = self.trunk
        dtype = tr.conv_in.weight.dtype
        t_emb = tr.time_proj(t.to(x.device)).to(dtype)
        emb = tr.time_embedding(t_emb)
        if tr.time_embed_act is not None:
            emb = tr.time_embed_act(emb)
        ehs = self.embedding.to(dtype).expand(x.shape[0], -1, -1)
        h = tr.conv_in(x.to(dtype))
        for block in tr.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if tr.mid_block is not None:
            if getattr(tr.mid_block, "has_cross_attention", False):
                h = tr.mid_block(h, emb, encoder_hidden_states=ehs)
            else:
                h = tr.mid_block(h, emb)
        return h

    def forward(self, z: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Latent z [B,4,H,W] -> logits [B,1,h,w] (fp32), one per mid-block position.

        t (int [B]) and noise ([B,4,H,W]) are drawn from ``generator`` when not given (t first).
        Gradients flow to z (for the generator's adversarial loss) and to the LoRA, embedding
        and head parameters.
        """
        B = z.shape[0]
        if t is None:
            t = self.draw_timesteps(B, generator, z.device)
        elif t.dim() == 0:
            t = t.expand(B)
        if noise is None:
            gdev = generator.device if generator is not None else z.device
            noise = torch.randn(z.shape, generator=generator, device=gdev, dtype=torch.float32).to(z.device)
        x = self.diffuse(z, t, noise)
        return self.head(self.features(x, t)).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
