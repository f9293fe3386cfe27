"""The DFOSD training loop: one-step generator vs. noise-aware discriminator, alternating updates.

One optimizer update (``grad_accum`` micro-batches, each process its own slice of the batch):

1. data: HR crops from ``ResumableSampler`` (fixed by seed and micro-step), degraded to LR with
   the Real-ESRGAN pipeline under a generator seeded by (seed, micro-step, process);
2. generator phase (D frozen): SR, z_hat = G(LR);
   L_G = MSE(SR, HR) + lambda_eadists * EA-DISTS(SR, HR) + lambda_adv * softplus(-D(F(z_hat, t)));
3. discriminator phase: L_D = softplus(-D(F(E(HR), t))) + softplus(D(F(z_hat.detach(), t'))),
   F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) eps with t ~ U{0..T} and eps drawn per call.

AdamW (lr 5e-5 by default) for both; autocast (bf16, or fp16 with gradient scaling) on CUDA only.
Every random draw of the loop comes from a generator seeded by (seed, micro-step, process,
purpose), so a run resumed from a state file recomputes exactly the losses the uninterrupted run
had at the same step (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dfosd.core.errors import DfosdError, problems_error
from dfosd.training.config import RESUME_MUST_MATCH, TrainConfig
from dfosd.training.data import HRImageFolder, ResumableSampler, dump_pairs, make_generator
from dfosd.training.processes import Processes, start_processes

log = logging.getLogger(__name__)

# purposes of the seeded generators (any distinct constants)
TAG_DEGRADE, TAG_G_ADV, TAG_D_REAL, TAG_D_FAKE, TAG_SAMPLES = 0xDE6, 0xA1, 0xA2, 0xA3, 0x5A
SAMPLE_IMAGES = 4
LOG_FILE = "train_log.csv"
SAMPLES_DIR = "samples"


@dataclass
class TrainResult:
    out: Path | None
    step: int
    log_dir: Path
    history: list[dict] = field(default_factory=list)  # one row per step run in this process
    seconds: float = 0.0


def dump_training_pairs(cfg: TrainConfig, say: Callable[[str], None] = log.info) -> list[tuple[Path, Path]]:
    """``--dump-pairs N DIR``: N degraded LR/HR pairs from the training data, and nothing else."""
    n, out_dir = cfg.dump_pairs
    dataset = HRImageFolder(cfg.data, cfg.crop)
    say(f"{len(dataset)} training images in {cfg.data}; writing {n} LR/HR pairs ({cfg.crop} px HR) to {out_dir}")
    return dump_pairs(dataset, n, out_dir, seed=cfg.seed)


class _RankSlice(torch.utils.data.Sampler):
    """This process's part of each global micro-batch."""

    def __init__(self, sampler: ResumableSampler, rank: int, micro: int):
        self.sampler, self.rank, self.micro = sampler, rank, micro

    def __iter__(self):
        for batch in self.sampler:
            yield batch[self.rank * self.micro:(self.rank + 1) * self.micro]

    def __len__(self):
        return len(self.sampler)


class Trainer:
    """Builds everything from a TrainConfig, checks cheap things first, then ``run()``."""

    def __init__(self, cfg: TrainConfig, *, dists=None, say: Callable[[str], None] = log.info,
                 procs: Processes | None = None):
        """``dists``: a DISTS module to use instead of finding weights (tests pass a tiny random one)."""
        from dfosd.core.bases import load_base

        self.cfg = cfg
        self.procs = procs or start_processes(cfg.device)
        self.device = self.procs.device
        self.say = say if self.procs.is_main else (lambda msg: None)
        self.log_dir = cfg.log_path

        # cheap checks first: data, perceptual weights, resume state; then the (large) base
        self.dataset = HRImageFolder(cfg.data, cfg.crop)
        self.data_id = _data_id(self.dataset)
        self.say(f"{len(self.dataset)} training images in {cfg.data}")
        self.dists = self._perceptual(dists)
        self.amp_dtype = _amp_dtype(cfg.mixed_precision, self.device)
        resume_state, resume_path = None, None
        if cfg.resume is not None:
            from dfosd.training.state import check_compatible, load_state, resolve_resume

            resume_path = resolve_resume(cfg.resume)
            resume_state = load_state(resume_path)
            check_compatible(resume_state, cfg.to_dict(), RESUME_MUST_MATCH, data_id=self.data_id, path=resume_path)
            if resume_state.get("world") != self.procs.world:
                raise DfosdError(f"cannot resume from {resume_path}: it ran on {resume_state.get('world')} "
                                 f"process(es), this run has {self.procs.world} (the per-process data split "
                                 "and degradation seeds would change)")

        self.say(f"loading base {cfg.base}")
        base = load_base(cfg.base)
        self.micro = self._check_base(base)
        self._build_models(base)
        self.step = 0
        self.resumed_from = None
        if resume_state is not None:
            self._load(resume_state)
            self.resumed_from = resume_path
            self.say(f"resumed from {resume_path} at step {self.step}")

    # ------------------------------------------------------------ setup

    def _perceptual(self, dists):
        cfg = self.cfg
        if cfg.perceptual == "none" or cfg.lambda_eadists == 0:
            return None
        if dists is None:
            from dfosd.training.losses import find_perceptual_weights, load_dists_weights

            dists = load_dists_weights(*find_perceptual_weights(cfg.perceptual_weights))
        self.say(f"EA-DISTS with {dists.name}")
        return dists.to(self.device).eval()

    def _check_base(self, base) -> int:
        cfg, world = self.cfg, self.procs.world
        problems = []
        n_train = int(base.scheduler_config.get("num_train_timesteps", 1000))
        if cfg.timestep >= n_train:
            problems.append(f"timestep {cfg.timestep} is outside the base scheduler's [0, {n_train - 1}]")
        unet_down = 2 ** (len(base.unet.config.down_block_types) - 1)
        factor = base.vae_scale_factor * unet_down
        if cfg.crop % factor:
            problems.append(f"crop {cfg.crop} is not a multiple of {factor} (the VAE's x{base.vae_scale_factor} "
                            f"and the UNet's x{unet_down} down-sampling of {cfg.base})")
        if cfg.batch_size % (cfg.grad_accum * world):
            problems.append(f"batch_size {cfg.batch_size} is not divisible by grad_accum {cfg.grad_accum} x "
                            f"{world} process(es)")
        if problems:
            raise problems_error(f"the settings do not fit base {cfg.base}", problems)
        return cfg.batch_size // (cfg.grad_accum * world)

    def _build_models(self, base) -> None:
        from dfosd.core.onestep import alphas_cumprod
        from dfosd.training.discriminator import NoiseAwareDiscriminator
        from dfosd.training.generator import OneStepGenerator

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # LoRA A factors and the D head are drawn from the global RNG
        # D copies the UNet's down/mid blocks: it must see the UNet before G injects its LoRA
        self.discriminator = NoiseAwareDiscriminator(base.unet, None, cfg.rank, cfg.alpha,
                                                     alphas_cumprod(base.scheduler_config))
        self.generator = OneStepGenerator(base, rank=cfg.rank, alpha=cfg.alpha, timestep=cfg.timestep,
                                          embedding_tokens=cfg.embedding_tokens,
                                          gradient_checkpointing=cfg.gradient_checkpointing,
                                          embedding_seed=cfg.seed, copy_unet=False)
        self.generator.to(self.device).train()
        self.discriminator.to(self.device).train()
        self.g_params = self.generator.trainable_parameters()
        self.d_named = [(n, p) for n, p in self.discriminator.named_parameters() if p.requires_grad]
        self.d_params = [p for _, p in self.d_named]
        self.opt_g = torch.optim.AdamW(self.g_params, lr=cfg.lr)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=cfg.lr)
        warmup = cfg.lr_warmup
        ramp = (lambda s: min(1.0, (s + 1) / warmup)) if warmup else (lambda s: 1.0)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, ramp)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, ramp)
        fp16 = self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=fp16)
        n_g, n_d = sum(p.numel() for p in self.g_params), sum(p.numel() for p in self.d_params)
        self.say(f"trainable: generator {n_g / 1e6:.2f} M (LoRA on {len(self.generator.lora_modules)} modules "
                 f"+ embedding), discriminator {n_d / 1e6:.2f} M; device {self.device}, "
                 f"autocast {self.amp_dtype or 'off'}, {self.procs.world} process(es)")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _gen(self, micro_step: int, tag: int) -> torch.Generator:
        return make_generator(self.cfg.seed, micro_step, self.procs.rank, tag, device=self.device)

    # ------------------------------------------------------------ data

    def loader(self, start_micro_step: int = 0):
        """This process's HR micro-batches from micro-step ``start_micro_step`` to the end of the run."""
        cfg = self.cfg
        sampler = ResumableSampler(len(self.dataset), self.micro * self.procs.world, cfg.seed,
                                   start_step=start_micro_step, num_steps=cfg.steps * cfg.grad_accum)
        workers = cfg.num_workers
        if workers is None:
            workers = 0 if self.device.type == "cpu" else min(4, os.cpu_count() or 1)
        return iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=_RankSlice(sampler, self.procs.rank,
                                                                                        self.micro),
                                                num_workers=workers, pin_memory=self.device.type == "cuda"))

    def degrade(self, hr: torch.Tensor, micro_step: int) -> torch.Tensor:
        from dfosd.training.degradations import degrade

        return degrade(hr, generator=self._gen(micro_step, TAG_DEGRADE))

    def micro_batch(self, loader, micro_step: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        hr = next(loader).to(self.device, non_blocking=True)
        return micro_step, hr, self.degrade(hr, micro_step)

    # ------------------------------------------------------------ one update

    def generator_losses(self, sr: torch.Tensor, z_hat: torch.Tensor, hr01: torch.Tensor,
                         adv_generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The terms of L_G for one micro-batch (``total`` is the weighted sum)."""
        from dfosd.training.losses import ea_dists, g_adv_loss

        cfg = self.cfg
        zero = sr.new_zeros(())
        # The image losses run in fp32 even under autocast: DISTS divides small feature statistics
        # (c = 1e-6), which bf16 cannot resolve; the price is fp32 (TF32) VGG16 passes.
        with torch.autocast(device_type=self.device.type, enabled=False):
            mse = F.mse_loss(sr.float(), hr01.float() * 2.0 - 1.0)
            ea = (ea_dists((sr.float() + 1.0) / 2.0, hr01.float(), self.dists).mean()
                  if self.dists is not None else zero)
        adv = g_adv_loss(self.discriminator(z_hat, generator=adv_generator)) if cfg.lambda_adv > 0 else zero
        total = mse + cfg.lambda_eadists * ea + cfg.lambda_adv * adv
        return {"total": total, "mse": mse, "ea_dists": ea, "g_adv": adv}

    def generator_phase(self, batches) -> tuple[dict[str, float], list]:
        """One generator update over the micro-batches (D frozen). Returns the mean losses and the
        (micro_step, real latent, fake latent) triples the discriminator phase judges."""
        accum = len(batches)
        for p in self.d_params:
            p.requires_grad_(False)  # D's weights get no gradient; z_hat still does, through D
        try:
            self.opt_g.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            latents = []
            for micro_step, hr, lr in batches:
                with self._autocast():
                    sr, z_hat = self.generator(lr)
                    z_real = self.generator.encode_hr(hr)
                    parts = self.generator_losses(sr, z_hat, hr, self._gen(micro_step, TAG_G_ADV))
                self.scaler_g.scale(parts["total"] / accum).backward()
                latents.append((micro_step, z_real.detach(), z_hat.detach()))
                parts["loss_g"] = parts.pop("total")
                for k, v in parts.items():  # summed on the device: no sync per micro-batch
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
            self.procs.average_gradients(self.g_params)
            self.scaler_g.step(self.opt_g)
            self.scaler_g.update()
            self.sched_g.step()
        finally:
            for p in self.d_params:
                p.requires_grad_(True)
        return {k: float(v) for k, v in sums.items()}, latents

    def discriminator_losses(self, micro_step: int, z_real: torch.Tensor, z_fake: torch.Tensor):
        from dfosd.training.losses import d_adv_loss

        real = self.discriminator(z_real, generator=self._gen(micro_step, TAG_D_REAL))
        fake = self.discriminator(z_fake, generator=self._gen(micro_step, TAG_D_FAKE))
        return d_adv_loss(real, fake), real, fake

    def discriminator_phase(self, latents) -> dict[str, float]:
        """One discriminator update on real E(x_H) vs. generated latents."""
        accum = len(latents)
        self.opt_d.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro_step, z_real, z_fake in latents:
            with self._autocast():
                loss, real, fake = self.discriminator_losses(micro_step, z_real, z_fake)
            self.scaler_d.scale(loss / accum).backward()
            # d_real / d_fake: D's mean P(real) on real and on generated latents
            for k, v in (("loss_d", loss), ("d_real", torch.sigmoid(real.float()).mean()),
                         ("d_fake", torch.sigmoid(fake.float()).mean())):
                sums[k] = sums.get(k, 0.0) + v.detach().float() / accum
        self.procs.average_gradients(self.d_params)
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()
        self.sched_d.step()
        return {k: float(v) for k, v in sums.items()}

    def update(self, batches) -> dict[str, float]:
        row = {"lr": float(self.sched_g.get_last_lr()[0])}
        g_stats, latents = self.generator_phase(batches)
        row.update(g_stats)
        if self.cfg.lambda_adv > 0:  # without the adversarial term nothing reads D: do not train it
            row.update(self.discriminator_phase(latents))
        return self.procs.mean(row)

    # ------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        from dfosd.core.cli_support import progress_bars
        from dfosd.training.reporting import CsvLog, losses_postfix

        cfg, main = self.cfg, self.procs.is_main
        t_start = time.perf_counter()
        history: list[dict] = []
        log_file = CsvLog(self.log_dir / LOG_FILE, resume_step=self.step if self.resumed_from else None) \
            if main else None
        if main and cfg.sample_every and self.step == 0:
            self.write_samples()  # the starting point (= the base one-step model), for comparison
        loader = self.loader(self.step * cfg.grad_accum)
        last_saved = self.step if self.resumed_from else None
        with tqdm(total=cfg.steps, initial=self.step, desc="dfosd-train", unit="step", dynamic_ncols=True,
                  disable=not (main and progress_bars(cfg.progress))) as bar, self._say_where_to_resume():
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batches = [self.micro_batch(loader, self.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
                row = self.update(batches)
                self.step += 1
                row.update(step=self.step, sec_per_step=time.perf_counter() - t0)
                history.append(row)
                if main:
                    log_file.write(row)
                    bar.set_postfix(losses_postfix(row), refresh=False)
                bar.update(1)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_state()
                    last_saved = self.step
                if main and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_samples()
        if last_saved != self.step:
            self.save_state()
        out = None
        if main:
            out = self.write_checkpoint(cfg.out)
            self.say(f"wrote {out} (step {self.step}); states, {LOG_FILE} and {SAMPLES_DIR}/ in {self.log_dir}")
        self.procs.barrier()
        return TrainResult(out, self.step, self.log_dir, history, time.perf_counter() - t_start)

    @contextlib.contextmanager
    def _say_where_to_resume(self):
        try:
            yield
        except KeyboardInterrupt:
            from dfosd.training.state import list_states

            states = list_states(self.log_dir)
            where = f"the newest state is step {states[-1][0]}" if states else "no state was saved yet"
            self.say(f"interrupted at step {self.step}; {where}: continue with --resume {self.log_dir}")
            raise

    # ------------------------------------------------------------ outputs

    def write_checkpoint(self, path: str | Path) -> Path:
        """The product: ``lora.safetensors`` in the checkpoint format (atomic write)."""
        return self.generator.save(path, dfosd_trained_by="dfosd-train", dfosd_train_step=str(self.step),
                                   dfosd_perceptual=self.dists.name if self.dists is not None else "none")

    @torch.no_grad()
    def sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed (HR, LR) crops for the sample images: the same in every run with this seed and data."""
        if not hasattr(self, "_samples"):
            k = min(SAMPLE_IMAGES, len(self.dataset))
            items = ResumableSampler(len(self.dataset), k, self.cfg.seed).batch(0)
            hr = torch.stack([self.dataset[item] for item in items]).to(self.device)
            from dfosd.training.degradations import degrade

            lr = degrade(hr, generator=make_generator(self.cfg.seed, TAG_SAMPLES, device=self.device))
            self._samples = (hr, lr)
        return self._samples

    @torch.no_grad()
    def write_samples(self) -> Path:
        from dfosd.training.reporting import sample_grid, save_png

        hr, lr = self.sample_batch()
        with self._autocast():
            sr, _ = self.generator(lr)
        return save_png(sample_grid(lr, sr, hr), self.log_dir / SAMPLES_DIR / f"step-{self.step:07d}.png")

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        from dfosd.training.state import capture_rng

        cfg = self.cfg
        return {
            "step": self.step,
            "config": cfg.to_dict(),
            "data_id": self.data_id,
            "data_files": len(self.dataset),
            "world": self.procs.world,
            "generator": {k: v.cpu() for k, v in self.generator.trainable_state().items()},
            "discriminator": {n: p.detach().cpu().clone() for n, p in self.d_named},
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict(),
            "scaler_g": self.scaler_g.state_dict(), "scaler_d": self.scaler_d.state_dict(),
            "rng": capture_rng(),
            "sampler": {"next_micro_step": self.step * cfg.grad_accum, "micro_batch": self.micro, "seed": cfg.seed},
        }

    def save_state(self) -> Path | None:
        from dfosd.training.state import save_state, state_path

        path = None
        if self.procs.is_main:  # the weights are identical in every process
            path = save_state(state_path(self.log_dir, self.step), self.state_dict(), keep=self.cfg.keep_states)
        self.procs.barrier()
        return path

    def _load(self, state: dict) -> None:
        from dfosd.training.state import restore_rng

        self.generator.load_trainable_state(state["generator"])
        saved_d = state["discriminator"]
        if sorted(saved_d) != sorted(n for n, _ in self.d_named):
            raise DfosdError("the training state's discriminator does not fit this run's",
                             hint="resume with the --base and --rank of the saved run")
        with torch.no_grad():
            for n, p in self.d_named:
                p.copy_(saved_d[n])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        if state.get("scaler_g"):
            self.scaler_g.load_state_dict(state["scaler_g"])
        if state.get("scaler_d"):
            self.scaler_d.load_state_dict(state["scaler_d"])
        restore_rng(state["rng"])
        self.step = int(state["step"])


def _data_id(dataset: HRImageFolder) -> str:
    """The data order depends on the sorted file list: its relative names identify it."""
    h = hashlib.sha256()
    for p in dataset.files:
        h.update(p.relative_to(dataset.root).as_posix().encode())
        h.update(b"\0")
    return h.hexdigest()


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if mode in ("bf16", "fp16"):
            raise DfosdError(f"--mixed-precision {mode} needs a CUDA device (this run uses {device})",
                             hint="use --mixed-precision no (or auto) on CPU")
        return None
    if mode == "no":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def train(cfg: TrainConfig, *, dists=None, say: Callable[[str], None] = log.info) -> TrainResult:
    """Train (or, with ``dump_pairs``, only write LR/HR pairs) as the configuration says."""
    if cfg.dump_pairs is not None:
        dump_training_pairs(cfg, say)
        return TrainResult(None, 0, Path(cfg.dump_pairs[1]))
    return Trainer(cfg, dists=dists, say=say).run()

