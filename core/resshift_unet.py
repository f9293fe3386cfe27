"""ResShift's ``UNetModelSwin`` (used by ResShift, SinSR and TAD-SR), written from its facts.

Facts read in wyf0912/SinSR f173549 ``models/unet.py`` (ResBlock lines 110-206, UNetModelSwin
587-877), ``models/swin_transformer.py`` (Mlp 17-33, window_partition/reverse 35-63,
WindowAttention 65-161, SwinTransformerBlock 163-299, BasicLayer 348-450, PatchEmbed/UnEmbed
452-530) and ``models/basic_ops.py`` (GroupNorm32 with 32 groups, timestep_embedding); the same
files are in zsyOAOA/ResShift. Module and parameter names are upstream's, so its state dicts load
as they are (``load_state_dict``). Only what the released configs use is built: 2-D, conv
resampling (``resblock_updown`` False), no patch norm, patch size 1, dropout 0.

Swin windows and the shifted-window mask are constants of the input size: the mask is made
for the size the block sees (upstream makes it for ``image_size`` at construction and again for
any other size at run time, with the same function), so an export at one tile size bakes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class SwinUNetConfig:
    image_size: int  # the size upstream built the model for: decides where Swin windows shrink
    in_channels: int
    model_channels: int
    out_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    swin_heads: int
    swin_depth: int
    swin_embed_dim: int
    window_size: int
    mlp_ratio: float
    use_scale_shift_norm: bool = True

    def level_window(self, level: int) -> tuple[int, int]:
        """(window, shift) of the Swin blocks at ``level``: upstream shrinks the window to the
        resolution and drops the shift when the resolution is not above the window."""
        res = self.image_size // 2 ** level
        if res <= self.window_size:
            return res, 0
        return self.window_size, self.window_size // 2

    def has_swin(self, level: int) -> bool:
        return self.image_size // 2 ** level in self.attention_resolutions

    @property
    def tile_multiple(self) -> int:
        """A latent tile must be a multiple of this: every level's size a multiple of its window."""
        levels = len(self.channel_mult)
        need = 1
        for level in range(levels):
            if self.has_swin(level) or level == levels - 1:
                window, _ = self.level_window(level)
                need = math.lcm(need, window * 2 ** level)
        return math.lcm(need, 2 ** (levels - 1))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * windows, ws * ws, C], windows row-major, pixels row-major inside."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, ws * ws, c)


def window_merge(windows: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


def shift_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """The additive attention mask of a shifted-window block at size h x w: [windows, ws², ws²].

    Upstream (swin_transformer.py calculate_mask) labels regions in a [1, 1, H, W] tensor indexed
    ``[:, h_slice, w_slice, :]``: the row slices land on a size-1 axis (only the last one selects
    anything) and the column slices on the H axis, so the labels vary along H only; its windows are
    then flattened column-major (``permute(0, 2, 3, 1)``). Trained weights saw exactly that mask,
    so it is reproduced as is."""
    import numpy as np  # a constant: made in numpy so tracing records one tensor, not the slicing

    img = np.zeros((1, 1, h, w), dtype=np.float32)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for vs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, vs, :] = cnt
            cnt += 1
    win = img.reshape(1, 1, h // ws, ws, w // ws, ws).transpose(0, 2, 4, 3, 5, 1).reshape(-1, ws, ws, 1)
    labels = win.transpose(0, 2, 3, 1).reshape(-1, ws * ws)
    diff = labels[:, None, :] - labels[:, :, None]
    return torch.from_numpy(np.where(diff != 0, -100.0, 0.0).astype(np.float32))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, heads: int):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int, shift: int, mlp_ratio: float, built_res: int):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = group_norm(dim)
        self.attn = WindowAttention(dim, ws, heads)
        self.norm2 = group_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # upstream keeps the mask for its image_size as a (persistent) buffer: its state dicts hold it
        self.register_buffer("attn_mask", shift_mask(built_res, built_res, ws, shift) if shift else None)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(2, 3))
        # made for this size (a constant of the traced graph); equal to the stored buffer at image_size
        mask = shift_mask(h, w, self.ws, self.shift).to(y.dtype) if self.shift else None
        y = window_merge(self.attn(window_partition(y, self.ws), mask), self.ws, b, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class Patch(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.proj(x)


class SwinLayer(nn.Module):
    """Upstream's BasicLayer: 1x1 conv to the Swin width, ``depth`` blocks (odd ones shifted), 1x1 back."""

    def __init__(self, cfg: SwinUNetConfig, channels: int, level: int):
        super().__init__()
        ws, shift = cfg.level_window(level)
        res = cfg.image_size // 2 ** level
        self.patch_embed = Patch(channels, cfg.swin_embed_dim)
        self.blocks = nn.ModuleList(SwinBlock(cfg.swin_embed_dim, cfg.swin_heads, ws, shift if i % 2 else 0,
                                              cfg.mlp_ratio, res) for i in range(cfg.swin_depth))
        self.patch_unembed = Patch(cfg.swin_embed_dim, channels)

    def forward(self, x):
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.patch_unembed(x)


class Step(nn.Sequential):
    """Upstream's TimestepEmbedSequential: ResBlocks get the time embedding, the rest do not."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class SwinUNet(nn.Module):
    """x [B, C, H, W] (the scaled latent), t [B], lq [B, C', H, W] -> x0 prediction [B, out, H, W]."""

    def __init__(self, cfg: SwinUNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, tdim, ss = cfg.model_channels, cfg.model_channels * 4, cfg.use_scale_shift_norm
        self.time_embed = nn.Sequential(nn.Linear(mc, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        ch = mc * cfg.channel_mult[0]
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skips = [ch]
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for j in range(cfg.num_res_blocks[level]):
                layers = [ResBlock(ch, tdim, mc * mult, ss)]
                ch = mc * mult
                if j == 0 and cfg.has_swin(level):
                    layers.append(SwinLayer(cfg, ch, level))
                self.input_blocks.append(Step(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(Step(Down(ch)))
                skips.append(ch)
        self.middle_block = Step(ResBlock(ch, tdim, ch, ss), SwinLayer(cfg, ch, last), ResBlock(ch, tdim, ch, ss))
        self.output_blocks = nn.ModuleList()
        for level in range(last, -1, -1):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [ResBlock(ch + skips.pop(), tdim, mc * mult, ss)]
                ch = mc * mult
                if i == 0 and cfg.has_swin(level):
                    layers.append(SwinLayer(cfg, ch, level))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Up(ch))
                self.output_blocks.append(Step(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc * cfg.channel_mult[0], cfg.out_channels, 3, padding=1))

    def forward(self, x, t, lq):
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        h = torch.cat([x, lq], dim=1)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)
