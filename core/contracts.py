"""Component contracts: the one description of each deployable part's tensors.

Export traces against them, engine builders and backends allocate from them, the
runtime chains components by their tensor names (each part's output is the next
part's input), and the manifest stores them. Nothing else spells out I/O names,
dtypes or shapes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import DENOISED, LATENT, LR_IMAGE, SR_IMAGE, SR_NONFINITE, stem

DTYPES = ("uint8", "float16", "float32")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype {self.dtype!r} not in {DTYPES}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def numpy_dtype(self):
        import numpy as np

        return np.dtype(self.dtype)

    def empty(self, device="cpu"):
        import torch

        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)


@dataclass(frozen=True)
class Geometry:
    """Static shapes shared by all parts: LR tile size, tile batch and model factors."""

    tile: int = 128
    batch: int = 1
    upscale: int = 4
    vae_scale_factor: int = 8
    latent_channels: int = 4

    def __post_init__(self):
        problems = []
        if self.batch < 1:
            problems.append(f"tile batch {self.batch} must be >= 1")
        if self.tile < 1 or (self.tile * self.upscale) % self.vae_scale_factor:
            problems.append(f"tile {self.tile} x upscale {self.upscale} must be a multiple of the VAE factor "
                            f"{self.vae_scale_factor} (e.g. --tile {max(8, self.tile // 8 * 8)})")
        if problems:
            raise DfosdError("; ".join(problems))

    @property
    def sr_tile(self) -> int:
        return self.tile * self.upscale

    @property
    def latent_tile(self) -> int:
        return self.sr_tile // self.vae_scale_factor


@dataclass(frozen=True)
class ComponentContract:
    component: str
    batch: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def stem(self) -> str:
        """File stem of this part's artifacts, e.g. ``unet_b4`` (one per tile batch)."""
        return stem(self.component, self.batch)

    def sample_inputs(self, seed: int = 0) -> dict[str, Any]:
        """Deterministic example inputs with realistic ranges (uint8 images, unit-variance latents)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.inputs:
            if spec.dtype == "uint8":
                out[spec.name] = torch.randint(0, 256, spec.shape, generator=g, dtype=torch.uint8)
            else:
                out[spec.name] = torch.randn(spec.shape, generator=g).to(spec.torch_dtype)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComponentContract":
        def specs(items):
            return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

        return cls(d["component"], int(d["batch"]), specs(d["inputs"]), specs(d["outputs"]))


def component_contracts(geo: Geometry) -> dict[str, ComponentContract]:
    b, t, s, lt, c = geo.batch, geo.tile, geo.sr_tile, geo.latent_tile, geo.latent_channels
    lr = TensorSpec(LR_IMAGE, "uint8", (b, 3, t, t))
    lat = TensorSpec(LATENT, "float32", (b, c, lt, lt))
    den = TensorSpec(DENOISED, "float32", (b, c, lt, lt))
    sr = TensorSpec(SR_IMAGE, "uint8", (b, 3, s, s))
    flag = TensorSpec(SR_NONFINITE, "uint8", (b,))
    return {
        "encoder": ComponentContract("encoder", b, (lr,), (lat,)),
        "unet": ComponentContract("unet", b, (lat,), (den,)),
        "decoder": ComponentContract("decoder", b, (den,), (sr, flag)),
    }


def nonfinite_flag(contract: ComponentContract) -> TensorSpec | None:
    """The part's per-tile "a value before the uint8 cast was NaN/Inf" output, if it has one
    (exports made before the flag existed have none)."""
    return next((s for s in contract.outputs if s.name == SR_NONFINITE), None)
