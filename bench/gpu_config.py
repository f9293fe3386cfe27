"""The GPU bench's configuration: row kinds and options, checked once (no torch: ``--help``
and option errors stay instant). ``gpu_bench.py`` (the command line) fills it,
``gpu_harness.py`` reads it."""

from __future__ import annotations

from dataclasses import dataclass

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import FLOAT_PRECISIONS

# Row kinds, in the order they run (here, not in gpu_harness, so that --help and the
# config need no torch)
ROW_KINDS = ("eager", "compile", "aoti", "onnxruntime", "tiled")


@dataclass(frozen=True)
class GpuBenchConfig:
    base: str = "synthetic:sd21-base"
    ckpt: str | None = None
    work_dir: str = ".gpu-bench"
    out_dir: str | None = None
    tile: int = 128
    batches: tuple[int, ...] = (1, 4, 8)
    rows: tuple[str, ...] = ROW_KINDS
    compile_batches: tuple[int, ...] = (1,)
    compile_mode: str = "max-autotune"
    aoti_precision: str | None = None  # default: fp16 on CUDA, fp32 on the CPU
    aoti_max_autotune: bool = False
    tiled_size: int = 2048
    tiled_overlap: int | None = None  # LR pixels; default tile // 8
    warmup: int = 3
    repeats: int = 20
    tiled_repeats: int = 5
    component_repeats: int = 10
    time_budget_s: float = 0.0  # 0: none

    def __post_init__(self):
        problems = []
        unknown = [r for r in self.rows if r not in ROW_KINDS]
        if unknown:
            problems.append(f"--rows {','.join(unknown)}: choose from {','.join(ROW_KINDS)}")
        if not self.batches or any(b < 1 for b in self.batches):
            problems.append(f"--batches {list(self.batches)}: integers >= 1")
        if self.repeats < 1 or self.warmup < 0 or self.tiled_repeats < 1:
            problems.append("--repeats/--tiled-repeats must be >= 1 and --warmup >= 0")
        if self.tiled_size % 4 or self.tiled_size < 4 * self.tile:
            problems.append(f"--tiled-size {self.tiled_size}: a multiple of 4, at least 4 x --tile")
        if self.aoti_precision is not None and self.aoti_precision not in FLOAT_PRECISIONS:
            problems.append(f"--aoti-precision {self.aoti_precision}: one of {', '.join(FLOAT_PRECISIONS)}")
        if problems:
            raise DfosdError("; ".join(problems))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @property
    def overlap(self) -> int:
        return self.tile // 8 if self.tiled_overlap is None else self.tiled_overlap
