"""Where the training loop runs: one process (any device), or N processes under ``accelerate launch``.

Multi-process training is plain data parallelism without a DDP wrapper: every process holds the
whole generator and discriminator, trains on its own slice of each batch, and the gradients of
the trainable parameters (LoRA, embeddings, D head: a few percent of the weights) are averaged
with one all-reduce per optimizer update. DDP is avoided on purpose: the GAN's alternating
phases freeze and unfreeze the discriminator, which DDP's gradient hooks do not allow without
``find_unused_parameters`` and its extra passes. ``accelerate`` (its ``PartialState``) only sets
up the process group and picks each process's device from what ``accelerate launch`` (or
``torchrun``) put in the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from dfosd.core.errors import DfosdError


@dataclass(frozen=True)
class Processes:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Mean of every process's gradients, in one flat all-reduce (no-op for one process)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this micro-batch did not reach still takes part
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in params])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Logged numbers averaged over processes (so the log describes the whole batch)."""
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, (t / self.world).tolist()))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def resolve_device(flag: str) -> torch.device:
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(flag)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DfosdError(f"--device {flag}: no CUDA GPU is visible to torch {torch.__version__}",
                             hint="use --device cpu (or auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DfosdError(f"--device {flag}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def start_processes(device_flag: str = "auto") -> Processes:
    """This process's place: rank/world from the launcher's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(resolve_device(device_flag))
    if device_flag not in ("auto", "cuda", "cpu"):
        raise DfosdError(f"--device {device_flag} with {world} processes: each process uses its own device",
                         hint="use --device auto (or cpu) under accelerate launch; choose GPUs with "
                              "CUDA_VISIBLE_DEVICES or accelerate's --gpu_ids")
    from accelerate import PartialState

    state = PartialState(cpu=device_flag == "cpu")
    return Processes(torch.device(state.device), state.process_index, state.num_processes)
