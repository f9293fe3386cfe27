"""ResShift's VQ-f4 autoencoder (``ldm.models.autoencoder.VQModelTorch``), written from its facts.

Facts read in wyf0912/SinSR f173549 ``ldm/models/autoencoder.py`` (VQModelTorch lines 12-57:
encode = encoder + quant_conv, no quantization; decode = codebook lookup + post_quant_conv +
decoder), ``ldm/modules/diffusionmodules/model.py`` (Normalize: GroupNorm 32 groups, eps 1e-6;
Upsample/Downsample with the (0, 1, 0, 1) pad; ResnetBlock; AttnBlock; Encoder 452-545, Decoder
546-650) and ``ldm/modules/vqvae/quantize.py`` (nearest code by z² + e² − 2 z·e, argmin). Module
names are upstream's, so ``autoencoder_vq_f4.pth`` loads as it is. Upstream runs the autoencoder in
fp16 (``use_fp16: True`` in the configs); here it is float32 like everything else, cast at export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VQConfig:
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    n_embed: int
    attn_levels: tuple[int, ...] = ()  # levels with attention after each res block (released: none)
    in_channels: int = 3
    out_ch: int = 3

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w)
        attn = torch.softmax((q @ k) * c ** -0.5, dim=2)
        return x + self.proj_out((v @ attn.transpose(1, 2)).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    def __init__(self, blocks: list, attn: bool, resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(AttnBlock(b.conv2.out_channels) for b in blocks) if attn else nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)
        self.resample_name = name if resample is not None else None

    def forward(self, x):
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        mults, last = (1,) + tuple(cfg.ch_mult), len(cfg.ch_mult) - 1
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            cin, cout = cfg.ch * mults[i], cfg.ch * m
            blocks = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)]
            self.down.append(Level(blocks, i in cfg.attn_levels, Downsample(cout) if i != last else None, "downsample"))
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid, self.norm_out = Mid(c), norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, cout))
                c = cout
            levels.insert(0, Level(blocks, i in cfg.attn_levels, Upsample(cout) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, run last (upstream's order)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n, dim)

    def forward(self, z):
        """Each latent pixel -> its nearest code (upstream's distance: z² + e² − 2 z·e; z² is the same for
        every code, so the argmin needs only e² − 2 z·e)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        e = self.embedding.weight
        idx = torch.argmin((e * e).sum(dim=1)[None] - 2 * flat @ e.t(), dim=1)
        return e[idx].view(b, h, w, c).permute(0, 3, 1, 2)


class VQAutoencoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Codebook(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h):
        return self.decoder(self.post_quant_conv(self.quantize(h)))
