"""Read a ResShift-backbone checkpoint pair (UNet file + VQ-f4 autoencoder file) into a one-step model.

Files as released: ``SinSR_v1.pth`` / ``SinSR_v2.pth`` (wyf0912/SinSR), ``resshift_realsrx4_s15_v1/_v2.pth``
and ``resshift_realsrx4_s4_v3.pth`` (zsyOAOA/ResShift), ``TAD-SR.pth`` (LearningHx/TAD-SR, no public
link), each beside ``autoencoder_vq_f4.pth``. Torch pickles, read ONLY with ``weights_only=True``
(core/readers.load_raw); a ``state_dict`` wrapper and a ``module.`` prefix are undone as upstream's
loader does. The architecture comes from ``--config`` (upstream's YAML) or from the keys.

The keys cannot tell a one-step student from its multi-step teacher (SinSR is distilled into
ResShift's very architecture), so the checkpoint kind comes from ``--family`` or the released file
name; the multi-step ResShift models are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dfosd.core.errors import DfosdError
from dfosd.core.resshift import (CHECKPOINTS, MULTI_STEP_REASON, EtaSchedule, ResShiftOneStep, load_strict,
                                 read_config, unet_config_from_state, unwrap_state, vq_config_from_state)

UNET_MARKERS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")
VQ_MARKERS = ("quantize.embedding.weight", "encoder.conv_in.weight", "decoder.conv_out.weight")
RESSHIFT_FAMILIES = tuple(CHECKPOINTS)


@dataclass(frozen=True)
class ResShiftModel:
    model: ResShiftOneStep
    family: str
    reason: str
    schedule: EtaSchedule
    files: dict  # role -> path


def looks_like_resshift(state: dict) -> bool:
    keys = {k[len("module."):] if k.startswith("module.") else k for k in state.get("state_dict", state)}
    return all(m in keys for m in UNET_MARKERS) and any(".patch_embed.proj.weight" in k for k in keys)


def not_exportable_yet(path: Path) -> DfosdError:
    """What the SD-family commands (export, convert, inspect) say about a ResShift-backbone file."""
    return DfosdError(f"{path}: a ResShift UNetModelSwin checkpoint (SinSR, TAD-SR or ResShift: not Stable "
                      "Diffusion); dfosd-export, convert and inspect do not compile this backbone yet",
                      hint="its one step and ONNX parts are in dfosd.core.resshift_reader.read_resshift(ckpt, "
                           "vq) and dfosd.core.resshift_parts (see README, 'A second backbone')")


def checkpoint_kind(path: Path, family: str | None) -> tuple[str, str]:
    """(family, why): --family, else the released file name."""
    if family is not None:
        if family not in CHECKPOINTS:
            raise DfosdError(f"--family {family}: not a ResShift-backbone family",
                             hint=f"use one of: {', '.join(RESSHIFT_FAMILIES)}")
        return family, f"--family {family}"
    for name, ckpt in CHECKPOINTS.items():
        if path.name in ckpt.files:
            return name, f"the file name {path.name} is {ckpt.upstream.split()[0]}'s release"
    raise DfosdError(f"{path}: a ResShift UNetModelSwin state dict, but one-step students (SinSR, TAD-SR) and "
                     "multi-step ResShift models share this architecture: the keys cannot say which",
                     hint=f"pass --family {' | '.join(RESSHIFT_FAMILIES)}")


def read_resshift(ckpt: str | Path, vq: str | Path, *, config: str | Path | None = None, family: str | None = None,
                  progress: Callable[[str], None] = lambda msg: None) -> ResShiftModel:
    from dfosd.core.readers import load_raw
    from dfosd.core.resshift_unet import SwinUNet
    from dfosd.core.resshift_vq import VQAutoencoder

    ckpt, vq = Path(ckpt), Path(vq)
    raw, _ = load_raw(ckpt)
    if not looks_like_resshift(raw):
        raise DfosdError(f"{ckpt}: not a ResShift UNetModelSwin state dict (no time_embed / input_blocks / "
                         "patch_embed keys)", hint="pass SinSR_v1.pth, TAD-SR.pth or a ResShift release")
    fam, why = checkpoint_kind(ckpt, family)
    spec = CHECKPOINTS[fam]
    unet_state = unwrap_state(raw, str(ckpt))
    vq_raw, _ = load_raw(vq)
    vq_state = unwrap_state(vq_raw, str(vq))
    if not all(m in vq_state for m in VQ_MARKERS):
        raise DfosdError(f"{vq}: not the VQ-f4 autoencoder (no quantize.embedding / encoder / decoder keys)",
                         hint="pass autoencoder_vq_f4.pth (ResShift's release) with --vq")
    if config is not None:
        unet_cfg, vq_cfg, schedule = read_config(config)
        source = f"--config {Path(config).name}"
    else:
        unet_cfg, vq_cfg, schedule = unet_config_from_state(unet_state, str(ckpt)), vq_config_from_state(vq_state, str(vq)), spec.schedule
        source = f"the state dicts' keys and {fam}'s released config ({spec.upstream.split()[0]})"
    if not spec.one_step:
        raise DfosdError(f"{ckpt}: {fam} is " + MULTI_STEP_REASON.format(steps=schedule.steps) + " (not supported)")
    progress(f"{ckpt.name}: family {fam} ({why}); architecture and schedule from {source}")
    unet = SwinUNet(unet_cfg)
    load_strict(unet, unet_state, str(ckpt))
    autoencoder = VQAutoencoder(vq_cfg)
    load_strict(autoencoder, vq_state, str(vq))
    model = ResShiftOneStep(unet.eval(), autoencoder.eval(), schedule)
    return ResShiftModel(model=model, family=fam, reason=why, schedule=schedule, files={"unet": ckpt, "vq": vq})


def describe_unet_file(path: str | Path) -> list[str] | None:
    """``dfosd inspect`` of a ResShift-backbone UNet file: what the keys and the file name say (None when
    the file is not one). Reads the tensors (weights-only), builds nothing."""
    from dfosd.core.readers import load_raw

    path = Path(path)
    if path.suffix not in (".pth", ".pt", ".ckpt", ".bin"):
        return None
    raw, _ = load_raw(path)
    if not looks_like_resshift(raw):
        return None
    state = unwrap_state(raw, str(path))
    cfg = unet_config_from_state(state, str(path))
    try:
        fam, why = checkpoint_kind(path, None)
        spec = CHECKPOINTS[fam]
        kind = (f"family: {fam} ({why}); " + ("one step" if spec.one_step else "multi-step: not supported") +
                f"; schedule {spec.schedule}")
    except DfosdError:
        kind = f"family: not known from the name (pass --family {' | '.join(RESSHIFT_FAMILIES)} to the reader)"
    params = sum(int(v.numel()) for k, v in state.items() if not k.endswith(("attn_mask", "relative_position_index")))
    return [f"file: {path}", "backbone: ResShift UNetModelSwin (VQ-f4 latent; not Stable Diffusion)", kind,
            f"architecture (from the keys): {cfg}", f"parameters: {params:,}",
            f"LR tile: a multiple of {cfg.tile_multiple} (Swin windows; latent tile = LR tile)",
            "needs: the VQ-f4 autoencoder (autoencoder_vq_f4.pth)",
            "dfosd-export / convert do not compile this backbone yet (see README, 'A second backbone')"]

