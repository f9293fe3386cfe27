"""Base models: where the frozen SD-2.1-base UNet and VAE come from.

A base spec is one of
- ``synthetic:tiny``       tiny configs, seeded random weights (tests);
- ``synthetic:sd21-base``  the real SD-2.1-base configs, seeded random weights (benchmarks);
- a diffusers directory    a full SD-2.1-base snapshot; only ``unet/``, ``vae/`` and
                           ``scheduler/`` are read (no text encoder: DFOSD learns its embedding);
- a hub id                 e.g. ``stabilityai/stable-diffusion-2-1-base`` (local cache first).

Everything downstream reads shapes from the loaded configs (embedding width from the
UNet's ``cross_attention_dim``, latent factor from the VAE's block count): nothing is
hard-coded to SD-2.1's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfosd.core.errors import DfosdError

if TYPE_CHECKING:  # heavy imports stay lazy: `dfosd --help` must not load torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_CONFIGS = {"tiny": "tiny", "sd21-base": "sd21-base"}
CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SYNTHETIC_SEED = 0


@dataclass
class Base:
    """A loaded base: frozen UNet and VAE plus the scheduler config."""

    spec: str
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    scheduler_config: dict[str, Any]
    fingerprint: str

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def is_synthetic(self) -> bool:
        return self.spec.startswith(SYNTHETIC_PREFIX)


def _json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _load_synthetic(name: str, spec: str) -> Base:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if name not in SYNTHETIC_CONFIGS:
        known = ", ".join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_CONFIGS)
        raise DfosdError(f"unknown synthetic base {spec!r}", hint=f"use one of: {known}")
    folder = CONFIG_ROOT / SYNTHETIC_CONFIGS[name]
    unet_cfg, vae_cfg, sched_cfg = (_json(folder / f) for f in ("unet.json", "vae.json", "scheduler.json"))
    # Seeded construction: diffusers initialises weights from torch's global RNG, so
    # the same seed, configs and torch version give the same "weights" every time.
    # The caller's RNG state is restored afterwards.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SYNTHETIC_SEED)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
    finally:
        torch.random.set_rng_state(state)
    return Base(spec, unet.eval(), vae.eval(), sched_cfg, _synthetic_fingerprint(name, spec))


def _synthetic_fingerprint(name: str, spec: str) -> str:
    import torch

    folder = CONFIG_ROOT / SYNTHETIC_CONFIGS[name]
    configs = [json.dumps(_json(folder / f), sort_keys=True) for f in ("unet.json", "vae.json", "scheduler.json")]
    # torch's initialisers define the random weights, so its version is part of the identity
    return _sha256_text(spec, *configs, f"seed={SYNTHETIC_SEED}", f"torch={torch.__version__}")


def _weights_fingerprint(folder: Path) -> list[str]:
    """Cheap but change-sensitive fingerprint of a model folder.

    Full hashes of multi-GB weight files on every export would cost seconds; configs are
    hashed fully, weight files by size plus the sha256 of their first and last MiB.
    """
    parts = []
    if not folder.is_dir():
        return parts
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        parts.extend(_weights_fingerprint_file(f, f.relative_to(folder).as_posix()))
    return parts


def _weights_fingerprint_file(f: Path, rel: str) -> list[str]:
    if f.suffix == ".json":
        return [rel + ":" + hashlib.sha256(f.read_bytes()).hexdigest()]
    if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt"):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(0, size - (1 << 20)))
            tail = fh.read(1 << 20)
        return [f"{rel}:{size}:{hashlib.sha256(head + tail).hexdigest()}"]
    return []


def _load_directory(folder: Path, spec: str) -> Base:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    missing = [sub for sub in ("unet", "vae", "scheduler") if not (folder / sub).is_dir()]
    if missing:
        raise DfosdError(
            f"base directory {folder} is not a diffusers SD-2.1-base snapshot: missing {', '.join(missing)}/",
            hint="pass a folder that holds unet/, vae/ and scheduler/ (e.g. a download of "
            f"{DEFAULT_BASE}), or --base synthetic:sd21-base for random weights",
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    except (OSError, ValueError, EnvironmentError) as exc:
        raise DfosdError(f"could not load the base from {folder}: {exc}") from exc
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = _json(sched_file) if sched_file.exists() else _json(CONFIG_ROOT / "sd21-base" / "scheduler.json")
    return Base(spec, unet.eval(), vae.eval(), sched, _directory_fingerprint(folder))


def _directory_fingerprint(folder: Path) -> str:
    return _sha256_text(*(p for sub in ("unet", "vae", "scheduler") for p in _weights_fingerprint(folder / sub)))


def _load_single_file(path: Path, spec: str) -> Base:
    """An original-format SD-2.1-base checkpoint (one .safetensors/.ckpt file)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg_dir = CONFIG_ROOT / "sd21-base"
    try:
        # diffusers converts the original LDM key layout; the configs come from our
        # bundled SD-2.1-base copies, so no hub access is needed.
        unet = UNet2DConditionModel.from_single_file(str(path), config=str(cfg_dir), subfolder=None)
        vae = AutoencoderKL.from_single_file(str(path), config=str(cfg_dir), subfolder=None)
    except Exception as exc:  # diffusers raises many types here; all mean "cannot use this file"
        raise DfosdError(
            f"could not load single-file base {path}: {exc}",
            hint="pass a diffusers directory (unet/, vae/, scheduler/) instead",
        ) from exc
    return Base(spec, unet.eval(), vae.eval(), _json(cfg_dir / "scheduler.json"), _file_fingerprint(path))


def _file_fingerprint(path: Path) -> str:
    return _sha256_text(*_weights_fingerprint_file(path, path.name))


def _load_hub(repo_id: str) -> Base:
    from huggingface_hub import snapshot_download

    patterns = ["unet/*.json", "unet/*.safetensors", "vae/*.json", "vae/*.safetensors", "scheduler/*"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        # Not in the local cache: try the network once, with a short timeout.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:
            raise DfosdError(
                f"could not fetch base {repo_id!r} from the Hugging Face hub "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})",
                hint="download it elsewhere and pass the local folder (--base /path/to/stable-diffusion-2-1-base, "
                "holding unet/, vae/, scheduler/), or use --base synthetic:sd21-base for random weights",
            ) from exc
    return _load_directory(Path(folder), repo_id)


def load_base(spec: str = DEFAULT_BASE) -> Base:
    """Load a base from a synthetic name, a local directory, a single file or a hub id."""
    if spec.startswith(SYNTHETIC_PREFIX):
        return _load_synthetic(spec[len(SYNTHETIC_PREFIX):], spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_directory(path, spec)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise DfosdError(f"base file {path} is neither .safetensors nor .ckpt",
                             hint="pass a diffusers directory or an SD-2.1-base single-file checkpoint")
        return _load_single_file(path, spec)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_like_path:
        raise DfosdError(f"base {spec!r} does not exist",
                         hint="pass an existing diffusers directory, a hub id like "
                         f"{DEFAULT_BASE}, or synthetic:tiny / synthetic:sd21-base")
    return _load_hub(spec)


def base_fingerprint(spec: str) -> str | None:
    """The base's identity without loading its weights (None: unknown until loaded)."""
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX):]
        return _synthetic_fingerprint(name, spec) if name in SYNTHETIC_CONFIGS else None
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_fingerprint(path)
    if path.is_file():
        return _file_fingerprint(path)
    try:  # a hub id already in the local cache
        from huggingface_hub import snapshot_download

        return _directory_fingerprint(Path(snapshot_download(spec, local_files_only=True)))
    except Exception:
        return None
