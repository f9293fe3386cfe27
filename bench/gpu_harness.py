"""The GPU bench's shared state: base, checkpoint, eager models, fp32 references, AOTI builds.

The rows themselves are in ``gpu_rows.py``, the report in ``gpu_report.py``, the
configuration in ``gpu_config.py``, the command line in ``gpu_bench.py`` (whose docstring
describes the rows).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dfosd.bench.gpu_config import ROW_KINDS
from dfosd.bench.gpu_report import RESULT_NAME, load_results, write_results
from dfosd.bench.measure import Memory, Timing, free_memory, time_runs
from dfosd.bench.results import machine_description

if TYPE_CHECKING:
    from dfosd.bench.gpu_config import GpuBenchConfig

PLACEHOLDER = (b"dfosd gpu_bench placeholder: contracts-only export, no ONNX graph here. "
               b"Only AOTInductor packages built from this directory's manifest run; re-export for ONNX.\n")


def tile_inputs(tile: int, batch: int):
    from dfosd.bench.run import bench_inputs

    return bench_inputs(tile, batch)


def tiled_input(lr_side: int):
    """One real photograph as a uint8 [3, lr_side, lr_side] LR image."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).convert("RGB").resize((lr_side, lr_side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def placeholder_part(module, contract, onnx_path, *, opset: int, precision: str) -> dict:
    """A part exporter (``export_checkpoint(part_exporter=...)``) that writes a few-byte placeholder."""
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path.write_bytes(PLACEHOLDER)
    return {"files": [onnx_path.name], "external_data": None, "opset": opset, "precision": precision,
            "initializer_bytes": 0, "placeholder": True}


def contracts_only_export(ckpt_path, base, out_dir, cfg, *, progress: Callable[[str], None]):
    """An export directory whose manifest is real and whose ONNX files are placeholders.

    ``export_checkpoint`` writes the manifest (contracts, batches, inputs, build key) from
    the base already in memory (the LoRA merged into a copy of its UNet), with
    ``placeholder_part`` as its part exporter: the full-size ONNX export (trace, fold,
    3.5 GB per UNet and batch) costs minutes of GPU-machine time, and AOTInductor does not
    read it. Bench-only: the onnxruntime/TensorRT backends cannot run such a directory (the
    placeholder says so), and the directory lives under the bench's work folder only.
    """
    from dfosd.export.artifacts import export_checkpoint

    return export_checkpoint(ckpt_path, base.spec, out_dir, cfg, progress=progress, base=base,
                             part_exporter=placeholder_part)


class GpuBench:
    """What the rows share: the base, the checkpoint, eager models, references, memory and the results."""

    def __init__(self, cfg: "GpuBenchConfig", say: Callable[[str], None] = print):
        import torch

        self.cfg = cfg
        self.say = say
        self.t0 = time.perf_counter()
        self.cuda = torch.cuda.is_available()
        self.dev = "cuda" if self.cuda else "cpu"
        if self.cuda:
            torch.cuda.init()
            torch.zeros(1, device="cuda")  # context up before the baseline is read
        self.memory = Memory(Memory.device_used())
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(cfg.out_dir) if cfg.out_dir else self.work / "results"
        self.result = load_results(self.out / f"{RESULT_NAME}.json", asdict(cfg),
                                   machine_description(gpu_details=True), say)
        self._base = None
        self._ckpt_path: Path | None = None
        self._eager: dict[str, Any] = {}
        self._refs: dict[str, Any] = {}

    # -- bookkeeping
    def over_budget(self) -> bool:
        return bool(self.cfg.time_budget_s) and time.perf_counter() - self.t0 > self.cfg.time_budget_s

    def save(self) -> None:
        write_results(self.result, self.out)

    def add(self, row: dict) -> None:
        self.result["rows"][row["id"]] = row
        self.save()
        if row.get("skipped"):
            self.say(f"  {row['id']:<34} skipped: {row['skipped']}")
        else:
            self.say(f"  {row['id']:<34} median {row['median_ms']:9.2f} ms  p90 {row['p90_ms']:9.2f} ms  "
                     f"{row['images_per_s']:8.2f} img/s  psnr {row.get('psnr_db')}  "
                     f"peak {row.get('peak_alloc_mib')} MiB  device {row.get('device_mib')} MiB")

    def skip(self, row_id: str, name: str, why: str, **extra) -> None:
        self.add({"id": row_id, "name": name, "skipped": why, **extra})

    def row(self, row_id: str, name: str, *, kind: str, precision: str, batch: int, out_side: int, m: Timing,
            ref, mem: dict, images: int | None = None, **extra) -> dict:
        from dfosd.core.metrics import max_abs_diff, psnr_uint8

        images = batch if images is None else images
        med = m.median_ms
        got = m.output.numpy() if m.output is not None else None
        psnr = None if ref is None or got is None else psnr_uint8(got, ref.numpy())
        row = {"id": row_id, "name": name, "kind": kind, "precision": precision, "device": self.dev, "batch": batch,
               "output": f"{images}x{out_side}x{out_side}", "median_ms": round(med, 3), "p90_ms": round(m.p90_ms, 3),
               "images_per_s": round(images * 1000.0 / med, 3),
               "megapixels_per_s": round(images * out_side * out_side / 1e6 * 1000.0 / med, 3),
               "psnr_db": None if psnr is None else (round(psnr, 2) if math.isfinite(psnr) else "inf"),
               "max_abs_diff": None if ref is None or got is None else max_abs_diff(got, ref.numpy()),
               "runs_ms": [round(t, 3) for t in m.runs_ms], **mem, **extra}
        self.add(row)
        return row

    # -- shared objects
    @property
    def base(self):
        if self._base is None:
            from dfosd.core.bases import load_base

            t = time.perf_counter()
            self.say(f"loading base {self.cfg.base}")
            self._base = load_base(self.cfg.base)
            self.say(f"  loaded in {time.perf_counter() - t:.1f} s")
        return self._base

    @property
    def ckpt_path(self) -> Path:
        if self._ckpt_path is None:
            from dfosd.core.checkpoint import write_random_checkpoint

            if self.cfg.ckpt:
                self._ckpt_path = Path(self.cfg.ckpt)
            else:
                self._ckpt_path = self.work / "lora.safetensors"
                if not self._ckpt_path.exists():  # seeded: the same file on every machine
                    write_random_checkpoint(self._ckpt_path, self.base, rank=16, alpha=16)
                    self.say(f"wrote a synthetic checkpoint {self._ckpt_path} (random LoRA, seeded)")
        return self._ckpt_path

    def eager(self, precision: str):
        """The eager one-step model in ``precision`` on the bench device (cached)."""
        if precision not in self._eager:
            import torch

            from dfosd.core.onestep import build_from_model
            from dfosd.core.readers import read_model

            dtype = torch.float16 if precision == "fp16" else torch.float32
            model = read_model(self.ckpt_path, base_spec=self.base.spec)  # any family
            # build_from_model copies the UNet and the VAE: the base stays as it is, on the CPU
            self._eager[precision] = build_from_model(self.base, model, dtype=dtype).to(self.dev)
        return self._eager[precision]

    def drop_eager(self, precision: str) -> None:
        self._eager.pop(precision, None)
        free_memory()

    def eager_step(self, precision: str) -> Callable:
        import torch

        model = self.eager(precision)

        def step(tiles):
            with torch.inference_mode():
                return model(tiles.to(self.dev)).cpu()

        return step

    def _ref_path(self, key: str) -> Path:
        return self.work / "refs" / f"tile{self.cfg.tile}_{key}.pt"

    def keep_reference(self, key: str, tensor) -> None:
        """Remember an eager fp32 output, in memory and on disk (later commands reuse it)."""
        import torch

        self._refs[key] = tensor
        path = self._ref_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensor, path)

    def _cached_reference(self, key: str, make):
        if key not in self._refs:
            import torch

            path = self._ref_path(key)
            if path.is_file():
                self._refs[key] = torch.load(path)
            else:
                self.keep_reference(key, make())
        return self._refs[key]

    def reference(self, batch: int):
        """Eager fp32 output for the batch's inputs (saved, so later commands reuse it)."""
        return self._cached_reference(f"b{batch}",
                                      lambda: self.eager_step("fp32")(tile_inputs(self.cfg.tile, batch)))

    def tiling(self, batch: int):
        from dfosd.runtime.tiling import TilingConfig

        return TilingConfig(tile=self.cfg.tile, overlap=self.cfg.overlap, batch=batch, scale=4)

    def tiled_reference(self, batch: int):
        from dfosd.runtime.tiling import upscale_tiled

        return self._cached_reference(
            f"tiled{self.cfg.tiled_size}_b{batch}",
            lambda: upscale_tiled(tiled_input(self.cfg.tiled_size // 4), self.eager_step("fp32"), self.tiling(batch)))

    # -- per-component timing
    def components_of_runner(self, runner) -> dict[str, float]:
        from dfosd.core.vocab import COMPONENTS

        out = {}
        for name in COMPONENTS:
            c = runner.contracts[name]
            ins = {s.name: runner.buffers[s.name] for s in c.inputs}
            outs = {s.name: runner.buffers[s.name] for s in c.outputs}
            eng = runner.engines[name]
            m = time_runs(lambda: eng.run(ins, outs), warmup=2, repeats=self.cfg.component_repeats)
            out[name] = round(m.median_ms, 3)
        return out

    def components_of_eager(self, precision: str, batch: int) -> dict[str, float]:
        import torch

        model = self.eager(precision)
        x = tile_inputs(self.cfg.tile, batch).to(self.dev)
        with torch.inference_mode():
            lat = model.encoder(x)
            den = model.unet(lat)
            fns = {"encoder": lambda: model.encoder(x), "unet": lambda: model.unet(lat),
                   "decoder": lambda: model.decoder(den)}
            return {n: round(time_runs(f, warmup=2, repeats=self.cfg.component_repeats).median_ms, 3)
                    for n, f in fns.items()}

    # -- AOTInductor builds (the aoti and tiled rows)

    def aoti_export_dir(self, batch: int) -> Path:
        from dfosd.export.artifacts import ExportConfig

        precision = self.aoti_precision
        out = self.work / f"aoti-export-{precision}-tile{self.cfg.tile}-b{batch}"
        contracts_only_export(self.ckpt_path, self.base, out,
                              ExportConfig(precision=precision, tile=self.cfg.tile, batches=(batch,)),
                              progress=self.say)
        return out

    @property
    def aoti_precision(self) -> str:
        return self.cfg.aoti_precision or ("fp16" if self.cuda else "fp32")

    def aoti_build(self, batch: int):
        """The AOTI packages for one tile batch (built, or reused when current); GPU memory freed after."""
        from dfosd.engines.aoti_build import export_aoti

        folder = self.aoti_export_dir(batch)
        res = export_aoti(folder, device=self.dev, precision=self.aoti_precision,
                          max_autotune=self.cfg.aoti_max_autotune, base_model=self.base, progress=self.say)
        free_memory()
        build_s = sum(c["export_seconds"] + c["compile_seconds"] for c in res.build["components"].values())
        return res, round(build_s, 1)

    def aoti_runner(self, res, batch: int, *, cuda_graph: bool):
        from dfosd.runtime.step import OneStepRunner

        return OneStepRunner(res.export_dir, backend="aoti", batch=batch, cuda_graph=cuda_graph, say=self.say)

    def run(self) -> dict:
        from dfosd.bench import gpu_rows

        order = {"eager": gpu_rows.run_eager, "compile": gpu_rows.run_compile, "aoti": gpu_rows.run_aoti,
                 "onnxruntime": gpu_rows.run_onnxruntime, "tiled": gpu_rows.run_tiled}
        for kind in ROW_KINDS:
            if kind in self.cfg.rows:
                self.say(f"== {kind}")
                order[kind](self)
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        return self.result
