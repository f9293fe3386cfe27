"""DFOSD's losses: EA-DISTS (DISTS on images and on their Sobel magnitudes) and the GAN terms.

``DISTS`` is Ding et al.'s metric (IEEE TPAMI 2020, reference code ``DISTS_pytorch``) written
out in plain torch: a VGG16 feature extractor whose max-pools are replaced by L2-pooling
(Hanning 3x3, stride 2), and per-channel structure/texture similarities of the input and the
five ``relu*_*`` stages weighted by learned ``alpha``/``beta``. Inputs are RGB in [0,1].

Weights: VGG16 ``features.*`` (torchvision's ``vgg16-397923af.pth`` works as is) plus DISTS's
``alpha``/``beta`` (``DISTS_pytorch/weights.pt``). ``load_dists_weights`` merges any number of
files holding those keys; ``save_dists_weights`` writes one combined safetensors file that
``--perceptual-weights PATH`` takes. ``find_perceptual_weights`` locates them on this machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfosd.core.errors import DfosdError

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)
TORCHVISION_VGG16_FILE = "vgg16-397923af.pth"
DISTS_PACKAGE = "DISTS_pytorch"
DISTS_PACKAGE_FILE = "weights.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- Sobel


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude sqrt(gx^2 + gy^2 + eps) of [B,C,H,W] (replicate padding)."""
    C = x.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    k = torch.stack([kx, kx.T])[:, None].repeat(C, 1, 1, 1)  # [2C,1,3,3]: gx, gy per channel
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=C)
    gx, gy = g[:, 0::2], g[:, 1::2]
    return torch.sqrt(gx * gx + gy * gy + eps)


# ---------------------------------------------------------------- DISTS


class L2Pooling(nn.Module):
    """sqrt(hanning3x3 * x^2), stride 2, depthwise: DISTS's replacement for VGG's max-pool."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])  # numpy.hanning(5)[1:-1]
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum())[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter.to(x.dtype), stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS(x, y) -> [B] distances (0 for identical images). Frozen: no trainable parameters.

    ``features`` follows torchvision's VGG16 indices (conv/ReLU pairs, L2Pooling at the max-pool
    slots, the last pool dropped), so ``features.N.weight`` loads torchvision weights directly.
    Build the real metric with ``load_dists_weights``; ``DISTS()`` alone has random weights.
    """

    def __init__(self, widths: Sequence[int] = VGG16_WIDTHS, convs: Sequence[int] = VGG16_CONVS, *,
                 name: str = "DISTS-VGG16 (random weights until loaded)"):
        super().__init__()
        if len(widths) != len(convs):
            raise ValueError("widths and convs need one entry per stage")
        self.name = name
        layers: list[nn.Module] = []
        self.taps: list[int] = []  # index of the last ReLU of each stage
        cin = 3
        for stage, (w, n) in enumerate(zip(widths, convs)):
            if stage > 0:
                layers.append(L2Pooling(cin))
            for _ in range(n):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=False)]
                cin = w
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.chns = [3, *widths]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("alpha", torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.register_buffer("beta", torch.full((1, sum(self.chns), 1, 1), 0.1))
        self.requires_grad_(False)
        self.eval()

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    @classmethod
    def tiny_random(cls, seed: int = 0) -> "DISTS":
        """A tiny DISTS with a RANDOM backbone (widths 4..16): for tests only, not a perceptual metric."""
        m = cls(widths=(4, 8, 8, 16, 16), convs=VGG16_CONVS,
                name=f"tiny-random DISTS (seed {seed}; random weights, NOT a perceptual metric)")
        g = torch.Generator().manual_seed(seed)
        for mod in m.features:
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu", generator=g)
                nn.init.normal_(mod.bias, 0.0, 0.01, generator=g)
        nn.init.normal_(m.alpha, 0.1, 0.01, generator=g)
        nn.init.normal_(m.beta, 0.1, 0.01, generator=g)
        return m

    def train(self, mode: bool = True) -> "DISTS":
        return super().train(False)  # no dropout/BN; stays in eval

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x]
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        taps = set(self.taps)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in taps:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"DISTS needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx, fy = self.feature_maps(x), self.feature_maps(y)
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w_sum, self.chns, dim=1)
        beta = torch.split(self.beta / w_sum, self.chns, dim=1)
        d1 = d2 = 0.0
        for k in range(len(self.chns)):
            xm = fx[k].mean([2, 3], keepdim=True)
            ym = fy[k].mean([2, 3], keepdim=True)
            s1 = (2 * xm * ym + c1) / (xm**2 + ym**2 + c1)
            d1 = d1 + (alpha[k] * s1).sum(1, keepdim=True)
            xv = ((fx[k] - xm) ** 2).mean([2, 3], keepdim=True)
            yv = ((fy[k] - ym) ** 2).mean([2, 3], keepdim=True)
            cov = (fx[k] * fy[k]).mean([2, 3], keepdim=True) - xm * ym
            s2 = (2 * cov + c2) / (xv + yv + c2)
            d2 = d2 + (beta[k] * s2).sum(1, keepdim=True)
        return 1 - (d1 + d2).flatten()


def ea_dists(x: torch.Tensor, y: torch.Tensor, dists: DISTS) -> torch.Tensor:
    """EA-DISTS [B] = DISTS(x, y) + DISTS(S(x), S(y)), S = Sobel magnitude; x, y RGB in [0,1]."""
    return dists(x, y) + dists(sobel_magnitude(x), sobel_magnitude(y))


# ---------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "params", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise DfosdError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return dict(sd)


def _dists_key(key: str) -> str | None:
    """Normalise the key spellings of torchvision VGG16, DISTS_pytorch / pyiqa modules and our file."""
    for prefix in ("module.", "net."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key in ("alpha", "beta"):
        return key
    parts = key.split(".")
    if parts[0].startswith("stage") and len(parts) == 3:  # stageK.N.weight -> features.N.weight
        parts = ["features", parts[1], parts[2]]
    if parts[0] == "features" and len(parts) == 3 and parts[2] in ("weight", "bias"):
        return ".".join(parts)
    return None  # classifier.*, L2 pooling filters, mean/std: not needed


def load_dists_weights(*paths: str | Path) -> DISTS:
    """The real DISTS (VGG16) from one or more files that together hold ``features.*``, ``alpha``, ``beta``.

    Accepts torchvision's ``vgg16-397923af.pth``, ``DISTS_pytorch/weights.pt``, a saved DISTS
    module state dict (``stageK.N.*`` keys) and the file ``save_dists_weights`` writes.
    """
    if not paths:
        raise DfosdError("load_dists_weights needs at least one weights file")
    merged: dict[str, torch.Tensor] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DfosdError(f"perceptual weights file {p} does not exist",
                             hint="pass --perceptual-weights PATH to an existing file, or --perceptual none")
        try:
            sd = _read_state_dict(p)
        except DfosdError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DfosdError(f"cannot read perceptual weights {p}: {e}") from e
        for k, v in sd.items():
            nk = _dists_key(k)
            if nk is not None and torch.is_tensor(v):
                merged[nk] = v
    m = DISTS(name="DISTS-VGG16 (" + ", ".join(Path(p).name for p in paths) + ")")
    expected = m.state_dict()
    missing = [k for k in expected if k not in merged]
    wrong = [f"{k}: file {tuple(merged[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in merged and merged[k].shape != v.shape]
    if missing or wrong:
        have_vgg = any(k.startswith("features.") for k in merged)
        have_ab = "alpha" in merged and "beta" in merged
        need = []
        if not have_vgg:
            need.append(f"VGG16 features (torchvision's {TORCHVISION_VGG16_FILE})")
        if not have_ab:
            need.append(f"DISTS alpha/beta ({DISTS_PACKAGE}/{DISTS_PACKAGE_FILE})")
        detail = "; ".join(need) if need else f"missing {missing[:4]} mismatched {wrong[:4]}"
        raise DfosdError(f"perceptual weights {[str(p) for p in paths]} are incomplete: {detail}",
                         hint="pass a file with both (see save_dists_weights), or --perceptual none")
    m.load_state_dict({k: merged[k].float() for k in expected})
    return m


def save_dists_weights(dists: DISTS, path: str | Path) -> Path:
    """Write one safetensors file with ``features.*``, ``alpha``, ``beta`` (for --perceptual-weights)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in dists.state_dict().items()}, str(path),
              metadata={"format": "dfosd-dists", "name": dists.name})
    return path


def _dists_package_file() -> Path | None:
    try:
        spec = importlib.util.find_spec(DISTS_PACKAGE)  # does not import it (it needs torchvision)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in spec.submodule_search_locations or [Path(spec.origin).parent if spec.origin else None]:
        if loc is not None and (Path(loc) / DISTS_PACKAGE_FILE).is_file():
            return Path(loc) / DISTS_PACKAGE_FILE
    return None


def _hub_vgg16_file() -> tuple[Path | None, Path]:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    exact = folder / TORCHVISION_VGG16_FILE
    if exact.is_file():
        return exact, folder
    others = sorted(folder.glob("vgg16-*.pth")) if folder.is_dir() else []
    others = [p for p in others if "bn" not in p.name]
    return (others[0] if others else None), folder


def find_perceptual_weights(explicit_path: str | Path | None = None) -> tuple[Path, ...]:
    """The files to pass to ``load_dists_weights``.

    An explicit path wins (it must exist). Otherwise: ``DISTS_pytorch``'s ``weights.pt``
    (alpha/beta, from ``pip install DISTS_pytorch``) plus torchvision's VGG16 in the torch hub
    cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``). Raises DfosdError naming
    ``--perceptual-weights PATH`` and ``--perceptual none`` when they are not all there.
    """
    hint = ("pass --perceptual-weights PATH (a file with VGG16 'features.*' and DISTS 'alpha'/'beta', "
            "e.g. written by dfosd.training.losses.save_dists_weights), or --perceptual none to train "
            "without EA-DISTS")
    if explicit_path is not None:
        p = Path(explicit_path).expanduser()
        if not p.is_file():
            raise DfosdError(f"perceptual weights file {p} does not exist", hint=hint)
        return (p,)
    ab = _dists_package_file()
    vgg, hub_dir = _hub_vgg16_file()
    if ab is not None and vgg is not None:
        return (ab, vgg)
    looked = [
        f"{DISTS_PACKAGE}/{DISTS_PACKAGE_FILE} (alpha/beta): "
        + (str(ab) if ab else f"not found ({DISTS_PACKAGE} is not installed or has no {DISTS_PACKAGE_FILE})"),
        "torch hub cache VGG16: " + (str(vgg) if vgg else f"no {TORCHVISION_VGG16_FILE} in {hub_dir}"),
    ]
    raise DfosdError("DISTS weights for EA-DISTS were not found:\n  " + "\n  ".join(looked), hint=hint)


# ---------------------------------------------------------------- GAN


def g_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits.float()).mean()


def d_adv_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()
