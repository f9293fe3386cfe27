"""GPU benchmark for one session on the GPU machine: eager, torch.compile and our engines, side by side.

Rows (each at every tile batch of ``--batches``, 512² output tiles with the default tile 128):

- ``eager``: eager PyTorch fp32 (the parity reference) and fp16: the diffusers modules of
  ``core/onestep.py`` as they are (SDPA attention processors), no compilation.
- ``compile``: ``torch.compile(mode="max-autotune")`` of the eager fp16 pipeline (the
  whole ``OneStepSR``; max-autotune includes inductor's CUDA graphs). Compile time is
  reported; only at ``--compile-batches`` (default 1) because each shape recompiles.
- ``aoti``: our AOTInductor packages (``export/aoti.py``) run by ``OneStepRunner``:
  fp16, the whole chain in ONE CUDA graph, and the same packages without the graph.
- ``onnxruntime``: ``OneStepRunner`` on the fp16 ONNX export, only when onnxruntime's
  CUDA execution provider is present (onnxruntime-gpu); otherwise a skipped row says why.
- ``tiled``: a ``--tiled-size``² output (default 2048²) through ``runtime.tiling.upscale_tiled``
  at the largest batch, with eager fp16 and with the AOTI graph runner, against the same
  tiling run with eager fp32.

Every timing is wall clock from uint8 tiles on the CPU to the uint8 image on the CPU
(host<->device copies included, as a caller sees it), after ``--warmup`` runs: median,
p90, images/s and megapixels/s. Memory: ``peak_alloc_mib`` is torch's allocator peak
during the timed runs (weights included; AOTInductor allocates its weights outside
torch's allocator, so it misses them), ``device_mib`` is what the process holds on the
GPU after them above the baseline after CUDA start-up (``cudaMemGetInfo``: torch's
reserved pool plus memory allocated outside torch). Parity: PSNR and max abs diff
against eager fp32 on the same inputs. Per-component times (encoder/unet/decoder, each
part alone, synchronised) for the engine runners and eager fp16; the report names the
fastest engine's.

Results accumulate in ``<out>/gpu_bench.json`` (rows keyed by id), so a session can run
the rows in several commands (each under the device's 10-minute limit) and every command
rewrites ``gpu_bench.md`` and ``gpu_bench.png`` from everything measured so far;
``--merge a.json b.json`` joins results brought back from separate machines.
``--time-budget-s`` stops starting new rows once spent, so a command ends in time.

Exports for the AOTI rows are *contracts-only* unless ONNX is needed for onnxruntime:
the full-size ONNX export (trace, fold, write 3.5 GB per UNet, per batch) costs minutes
of GPU-machine time and AOTInductor does not read it; see ``contracts_only_export``.

CPU smoke test (tiny model, a minute or two)::

    python -m dfosd.bench.gpu_bench --base synthetic:tiny --tile 32 --batches 1 \\
        --rows eager,aoti,tiled --tiled-size 256 --warmup 1 --repeats 3 --work /tmp/gb
"""

from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from dfosd.core.errors import DfosdError

log = logging.getLogger(__name__)

ROW_KINDS = ("eager", "compile", "aoti", "onnxruntime", "tiled")
RESULT_NAME = "gpu_bench"
PLACEHOLDER = (b"dfosd gpu_bench placeholder: contracts-only export, no ONNX graph here. "
               b"Only AOTInductor packages built from this directory's manifest run; re-export for ONNX.\n")


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
        if self.aoti_precision not in (None, "fp32", "fp16"):
            problems.append(f"--aoti-precision {self.aoti_precision}: fp32 or fp16")
        if problems:
            raise DfosdError("; ".join(problems))
        object.__setattr__(self, "batches", tuple(sorted(set(self.batches))))

    @property
    def overlap(self) -> int:
        return self.tile // 8 if self.tiled_overlap is None else self.tiled_overlap


# ----------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    runs_ms: list[float]
    output: Any = None  # uint8 CPU tensor of the last run

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)

    @property
    def p90_ms(self) -> float:
        from dfosd.bench.measure import Timing

        return Timing(tuple(self.runs_ms)).p90_ms


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int) -> Measured:
    out = None
    for _ in range(warmup):
        out = fn()
    _sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync()
        runs.append((time.perf_counter() - t0) * 1000.0)
    return Measured(runs, out)


class Memory:
    """torch allocator peak and device memory held, around one row."""

    def __init__(self, baseline_used: int):
        self.baseline_used = baseline_used

    @staticmethod
    def device_used() -> int:
        import torch

        if not torch.cuda.is_available():
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    def start(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, float | None]:
        import torch

        if not torch.cuda.is_available():
            return {"peak_alloc_mib": None, "device_mib": None}
        torch.cuda.synchronize()
        return {"peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "device_mib": round((self.device_used() - self.baseline_used) / 2**20, 1)}


def free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- inputs and exports


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


def contracts_only_export(ckpt_path, base, out_dir, cfg, *, progress: Callable[[str], None]):
    """An export directory whose manifest is real and whose ONNX files are placeholders.

    ``export_checkpoint`` writes the manifest (contracts, batches, inputs, build key);
    only the ONNX tracing is replaced by a few-byte placeholder per part, and its base
    loading by the base already in memory (the LoRA is merged into a copy of its UNet).
    Bench-only: the onnxruntime/TensorRT backends cannot run such a directory (the
    placeholder says so), and the directory lives under the bench's work folder only.
    """
    import copy
    import dataclasses
    from unittest import mock

    import dfosd.core.bases as bases
    import dfosd.export.onnx_export as onnx_export
    from dfosd.export.artifacts import export_checkpoint

    def placeholder_part(module, contract, onnx_path, *, opset, precision):
        onnx_path = Path(onnx_path)
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(PLACEHOLDER)
        return {"files": [onnx_path.name], "external_data": None, "opset": opset, "precision": precision,
                "initializer_bytes": 0, "placeholder": True}

    def this_base(spec):
        if spec != base.spec:
            raise DfosdError(f"contracts-only export of {spec} asked, the bench holds {base.spec}")
        return dataclasses.replace(base, unet=copy.deepcopy(base.unet))

    with mock.patch.object(onnx_export, "export_part", placeholder_part), mock.patch.object(bases, "load_base",
                                                                                            this_base):
        return export_checkpoint(ckpt_path, base.spec, out_dir, cfg, progress=progress)


# ----------------------------------------------------------------------------- the bench


class GpuBench:
    def __init__(self, cfg: GpuBenchConfig, say: Callable[[str], None] = print):
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
        self.result = load_results(self.out / f"{RESULT_NAME}.json", cfg, say)
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

    def row(self, row_id: str, name: str, *, kind: str, precision: str, batch: int, out_side: int, m: Measured,
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

            from dfosd.core.checkpoint import read_checkpoint
            from dfosd.core.onestep import build_onestep

            dtype = torch.float16 if precision == "fp16" else torch.float32
            base = self.base
            if dtype == torch.float32:  # build_onestep shares the VAE in fp32: keep the base's on the CPU
                import copy
                import dataclasses

                base = dataclasses.replace(base, vae=copy.deepcopy(base.vae))
            self._eager[precision] = build_onestep(base, read_checkpoint(self.ckpt_path), dtype=dtype).to(self.dev)
        return self._eager[precision]

    def drop_eager(self, precision: str) -> None:
        self._eager.pop(precision, None)
        free_gpu()

    def eager_step(self, precision: str) -> Callable:
        import torch

        model = self.eager(precision)

        def step(tiles):
            with torch.inference_mode():
                return model(tiles.to(self.dev)).cpu()

        return step

    def reference(self, batch: int):
        """Eager fp32 output for the batch's inputs (saved, so later commands reuse it)."""
        import torch

        key = f"b{batch}"
        path = self.work / "refs" / f"tile{self.cfg.tile}_{key}.pt"
        if key not in self._refs:
            if path.is_file():
                self._refs[key] = torch.load(path)
            else:
                self._refs[key] = self.eager_step("fp32")(tile_inputs(self.cfg.tile, batch))
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._refs[key], path)
        return self._refs[key]

    def tiling(self, batch: int):
        from dfosd.runtime.tiling import TilingConfig

        return TilingConfig(tile=self.cfg.tile, overlap=self.cfg.overlap, batch=batch, scale=4)

    def tiled_reference(self, batch: int):
        import torch

        from dfosd.runtime.tiling import upscale_tiled

        key = f"tiled{self.cfg.tiled_size}_b{batch}"
        path = self.work / "refs" / f"tile{self.cfg.tile}_{key}.pt"
        if key not in self._refs:
            if path.is_file():
                self._refs[key] = torch.load(path)
            else:
                image = tiled_input(self.cfg.tiled_size // 4)
                self._refs[key] = upscale_tiled(image, self.eager_step("fp32"), self.tiling(batch))
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(self._refs[key], path)
        return self._refs[key]

    # -- per-component timing
    def components_of_runner(self, runner) -> dict[str, float]:
        from dfosd.core.vocab import COMPONENTS

        out = {}
        for name in COMPONENTS:
            c = runner.contracts[name]
            ins = {s.name: runner.buffers[s.name] for s in c.inputs}
            outs = {s.name: runner.buffers[s.name] for s in c.outputs}
            eng = runner.engines[name]
            m = measure(lambda: eng.run(ins, outs), warmup=2, repeats=self.cfg.component_repeats)
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
            return {n: round(measure(f, warmup=2, repeats=self.cfg.component_repeats).median_ms, 3)
                    for n, f in fns.items()}

    # -- rows
    def run_eager(self) -> None:
        precisions = ["fp32"] + (["fp16"] if self.cuda else [])
        if not self.cuda:
            self.skip("eager-fp16", "eager PyTorch fp16", "no CUDA GPU: CPU half-precision convolutions are not a "
                      "meaningful baseline")
        for prec in precisions:
            model = None
            for batch in self.cfg.batches:
                row_id = f"eager-{prec}/b{batch}"
                if self.over_budget():
                    self.skip(row_id, f"eager PyTorch {prec}", "time budget spent", batch=batch)
                    continue
                self.memory.start()
                model = self.eager(prec)
                attn = sorted({type(p).__name__ for p in model.unet.unet.attn_processors.values()})
                x = tile_inputs(self.cfg.tile, batch)
                step = self.eager_step(prec)
                m = measure(lambda: step(x), warmup=self.cfg.warmup, repeats=self.cfg.repeats)
                mem = self.memory.read()
                ref = self.reference(batch) if prec != "fp32" else m.output
                if prec == "fp32":  # this run is the reference: keep it for later commands
                    self._refs[f"b{batch}"] = m.output
                    path = self.work / "refs" / f"tile{self.cfg.tile}_b{batch}.pt"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    import torch

                    torch.save(m.output, path)
                comps = self.components_of_eager(prec, batch) if prec == "fp16" else None
                self.row(row_id, f"eager PyTorch {prec}", kind="eager", precision=prec, batch=batch,
                         out_side=4 * self.cfg.tile, m=m, ref=ref, mem=mem, attention=attn, components_ms=comps)
            if prec == "fp32" and "tiled" in self.cfg.rows and not self.over_budget():
                self.tiled_reference(max(self.cfg.batches))  # the fp32 model is at hand: make the reference now
            self.drop_eager(prec)  # each row group measures its own memory

    def run_compile(self) -> None:
        import torch

        prec = "fp16" if self.cuda else "fp32"
        for batch in self.cfg.compile_batches:
            row_id = f"compile-{self.cfg.compile_mode}-{prec}/b{batch}"
            name = f"torch.compile {self.cfg.compile_mode} {prec}"
            if self.over_budget():
                self.skip(row_id, name, "time budget spent", batch=batch)
                continue
            ref = self.reference(batch)
            torch._dynamo.reset()
            self.memory.start()
            model = self.eager(prec)
            compiled = torch.compile(model, mode=self.cfg.compile_mode)
            x = tile_inputs(self.cfg.tile, batch)

            def step():
                with torch.inference_mode():
                    return compiled(x.to(self.dev)).cpu()

            t = time.perf_counter()
            try:
                step()
            except Exception as exc:  # report a compiler failure as a row, keep the other rows
                self.skip(row_id, name, f"compile failed: {type(exc).__name__}: {str(exc)[:300]}", batch=batch)
                continue
            compile_s = time.perf_counter() - t
            m = measure(step, warmup=self.cfg.warmup, repeats=self.cfg.repeats)
            self.row(row_id, name, kind="compile", precision=prec, batch=batch, out_side=4 * self.cfg.tile, m=m,
                     ref=ref, mem=self.memory.read(), build_seconds=round(compile_s, 1))
            compiled = None  # noqa: F841  (release before the next row)
            torch._dynamo.reset()
            self.drop_eager(prec)

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
        free_gpu()
        build_s = sum(c["export_seconds"] + c["compile_seconds"] for c in res.build["components"].values())
        return res, round(build_s, 1)

    def aoti_runner(self, res, batch: int, *, cuda_graph: bool):
        from dfosd.runtime.step import OneStepRunner

        return OneStepRunner(res.export_dir, backend="aoti", batch=batch, cuda_graph=cuda_graph, say=self.say)

    def run_aoti(self) -> None:
        prec = self.aoti_precision
        for batch in self.cfg.batches:
            graph_id, plain_id = f"aoti-{prec}-graph/b{batch}", f"aoti-{prec}/b{batch}"
            if self.over_budget():
                self.skip(graph_id, f"aoti {prec} (one CUDA graph)", "time budget spent", batch=batch)
                continue
            ref = self.reference(batch)
            x = tile_inputs(self.cfg.tile, batch)
            try:
                res, build_s = self.aoti_build(batch)
                self.memory.start()
                runner = self.aoti_runner(res, batch, cuda_graph=True)
            except Exception as exc:
                self.skip(graph_id, f"aoti {prec}", f"build/load failed: {type(exc).__name__}: {str(exc)[:400]}",
                          batch=batch)
                continue
            extra = {"build_seconds": build_s, "reused_packages": res.reused,
                     "channels_last": res.build["channels_last"], "max_autotune": res.build["max_autotune"]}
            if self.cuda:
                m = measure(lambda: runner(x), warmup=self.cfg.warmup, repeats=self.cfg.repeats)
                captured = runner._graph is not None and runner._use_graph
                self.row(graph_id, f"aoti {prec} (one CUDA graph)", kind="engine", precision=prec, batch=batch,
                         out_side=4 * self.cfg.tile, m=m, ref=ref, mem=self.memory.read(), cuda_graph=captured,
                         **extra, **({} if captured else {"note": "capture failed: ran without the graph"}))
                runner = None
                free_gpu()
                self.memory.start()
                runner = self.aoti_runner(res, batch, cuda_graph=False)
            else:
                self.skip(graph_id, f"aoti {prec} (one CUDA graph)", "no CUDA GPU: CUDA graphs need one", batch=batch)
            m = measure(lambda: runner(x), warmup=self.cfg.warmup, repeats=self.cfg.repeats)
            mem = self.memory.read()
            self.row(plain_id, f"aoti {prec} (no graph)", kind="engine", precision=prec, batch=batch,
                     out_side=4 * self.cfg.tile, m=m, ref=ref, mem=mem, cuda_graph=False,
                     components_ms=self.components_of_runner(runner), **extra)
            runner = None  # noqa: F841
            free_gpu()

    def run_onnxruntime(self) -> None:
        try:
            import onnxruntime as ort

            providers = ort.get_available_providers()
        except ImportError as exc:
            self.skip("onnxruntime", "onnxruntime", f"onnxruntime does not import ({exc})")
            return
        if self.cuda and "CUDAExecutionProvider" not in providers:
            self.skip("onnxruntime", "onnxruntime", f"onnxruntime {ort.__version__} has no CUDA execution provider "
                      f"(providers {providers}); carry an onnxruntime-gpu wheel to time it")
            return
        from dfosd.export.artifacts import ExportConfig, export_checkpoint
        from dfosd.runtime.step import OneStepRunner

        prec = "fp16" if self.cuda else "fp32"
        for batch in self.cfg.batches:
            row_id = f"onnxruntime-{prec}/b{batch}"
            if self.over_budget():
                self.skip(row_id, f"onnxruntime {prec}", "time budget spent", batch=batch)
                continue
            ref = self.reference(batch)
            t = time.perf_counter()
            folder = export_checkpoint(self.ckpt_path, self.cfg.base, self.work / f"onnx-{prec}-tile{self.cfg.tile}-b{batch}",
                                       ExportConfig(precision=prec, tile=self.cfg.tile, batches=(batch,)),
                                       progress=self.say).out_dir
            build_s = time.perf_counter() - t
            self.memory.start()
            runner = OneStepRunner(folder, backend="onnxruntime", batch=batch, say=self.say)
            x = tile_inputs(self.cfg.tile, batch)
            m = measure(lambda: runner(x), warmup=self.cfg.warmup, repeats=self.cfg.repeats)
            self.row(row_id, f"onnxruntime {prec} ({runner.backend.device})", kind="engine", precision=prec, batch=batch,
                     out_side=4 * self.cfg.tile, m=m, ref=ref, mem=self.memory.read(),
                     components_ms=self.components_of_runner(runner), build_seconds=round(build_s, 1))
            runner = None  # noqa: F841
            free_gpu()

    def run_tiled(self) -> None:
        size, batch = self.cfg.tiled_size, max(self.cfg.batches)
        try:
            from dfosd.runtime.tiling import plan_tiles, upscale_tiled
        except ImportError as exc:
            self.skip(f"tiled{size}", f"tiled {size}²", f"runtime.tiling is not available here ({exc})")
            return
        image = tiled_input(size // 4)
        tiles = len(plan_tiles(size // 4, size // 4, self.tiling(batch)))
        extra = {"tiles": tiles, "tile_overlap_lr": self.cfg.overlap}
        ref = self.tiled_reference(batch)
        steps: list[tuple[str, str, str, Callable[[], tuple[Callable, Callable]]]] = []
        if self.cuda:
            steps.append((f"tiled{size}-eager-fp16/b{batch}", f"tiled {size}² eager PyTorch fp16", "fp16",
                          lambda: (self.eager_step("fp16"), lambda: self.drop_eager("fp16"))))
        else:
            steps.append((f"tiled{size}-eager-fp32/b{batch}", f"tiled {size}² eager PyTorch fp32", "fp32",
                          lambda: (self.eager_step("fp32"), lambda: self.drop_eager("fp32"))))

        def aoti_step():
            res, _ = self.aoti_build(batch)
            return self.aoti_runner(res, batch, cuda_graph=True), free_gpu

        prec = self.aoti_precision
        steps.append((f"tiled{size}-aoti-{prec}{'-graph' if self.cuda else ''}/b{batch}",
                      f"tiled {size}² aoti {prec}{' (one CUDA graph)' if self.cuda else ''}", prec, aoti_step))
        for row_id, name, p, make in steps:
            if self.over_budget():
                self.skip(row_id, name, "time budget spent", batch=batch)
                continue
            try:
                step, release = make()
            except Exception as exc:
                self.skip(row_id, name, f"build/load failed: {type(exc).__name__}: {str(exc)[:400]}", batch=batch)
                continue
            self.memory.start()  # after the build: the peak still counts the weights, which stay allocated
            m = measure(lambda: upscale_tiled(image, step, self.tiling(batch)), warmup=1,
                        repeats=self.cfg.tiled_repeats)
            self.row(row_id, name, kind="tiled", precision=p, batch=batch, out_side=size, m=m, ref=ref,
                     mem=self.memory.read(), images=1, **extra)
            step = None  # noqa: F841
            release()

    def run(self) -> dict:
        order = {"eager": self.run_eager, "compile": self.run_compile, "aoti": self.run_aoti,
                 "onnxruntime": self.run_onnxruntime, "tiled": self.run_tiled}
        for kind in ROW_KINDS:
            if kind in self.cfg.rows:
                self.say(f"== {kind}")
                order[kind]()
        self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        return self.result


# ----------------------------------------------------------------------------- results


def machine_description() -> dict:
    import torch

    from dfosd.bench.run import machine_description as base_description

    info = base_description()
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        info.update(sm=f"{major}.{minor}", gpu_memory_gib=round(total / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    try:
        import onnxruntime as ort

        info["onnxruntime"] = f"{ort.__version__} {ort.get_available_providers()}"
    except ImportError:
        info["onnxruntime"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def load_results(path: Path, cfg: GpuBenchConfig, say: Callable[[str], None]) -> dict:
    fresh = {"format": 1, "kind": "dfosd-gpu-bench", "machine": machine_description(), "config": asdict(cfg),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": {}}
    if not path.is_file():
        return fresh
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return fresh
    same = (old.get("config", {}).get("base") == cfg.base and old.get("config", {}).get("tile") == cfg.tile
            and old.get("machine", {}).get("gpu") == fresh["machine"].get("gpu"))
    if not same:
        say(f"{path} holds results of another base/tile/machine: starting a new file")
        return fresh
    old["config"] = asdict(cfg)
    old["machine"] = fresh["machine"]
    return old


def merge_results(paths: list[Path]) -> dict:
    merged: dict | None = None
    for p in paths:
        data = json.loads(Path(p).read_text())
        if merged is None:
            merged = data
        else:
            merged["rows"].update(data.get("rows", {}))
    if merged is None:
        raise DfosdError("--merge needs at least one gpu_bench.json")
    return merged


def _fmt(v, spec=".1f") -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_report(result: dict) -> str:
    rows = [r for r in result["rows"].values() if not r.get("skipped")]
    skipped = [r for r in result["rows"].values() if r.get("skipped")]
    m = result["machine"]
    cfg = result["config"]
    lines = [f"# dfosd GPU bench: {cfg['base']}",
             "",
             f"Machine: {m.get('gpu') or m.get('cpu')} (SM {m.get('sm', '-')}), torch {m.get('torch')}, CUDA "
             f"{m.get('cuda', '-')}, diffusers {m.get('diffusers')}, onnxruntime {m.get('onnxruntime')}. "
             f"Wall clock from uint8 CPU tiles to the uint8 CPU image, after {cfg['warmup']} warm-up runs, "
             f"{cfg['repeats']} timed ({cfg['tiled_repeats']} for tiled). PSNR against eager PyTorch fp32 on the "
             "same inputs. peak alloc: torch's allocator (misses AOTInductor weights); device: held on the GPU "
             "above the CUDA baseline.", ""]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["output"] if r["kind"] != "tiled" else f"tiled {r['output']}", []).append(r)
    for title, rs in sorted(groups.items(), key=lambda kv: (kv[0].startswith("tiled"), kv[1][0]["batch"])):
        eager32 = next((r for r in rs if r["kind"] == "eager" and r["precision"] == "fp32"), None)
        lines += [f"## {title} (batch {rs[0]['batch']})", "",
                  "| engine | median ms | p90 ms | images/s | MP/s | vs eager fp32 | PSNR dB | max diff | "
                  "peak alloc MiB | device MiB | build s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rs, key=lambda r: r["median_ms"]):
            speed = f"{eager32['median_ms'] / r['median_ms']:.2f}x" if eager32 else ""
            psnr = "reference" if r is eager32 else _fmt(r.get("psnr_db"))
            lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.2f} | "
                         f"{r['megapixels_per_s']:.2f} | {speed} | {psnr} | {_fmt(r.get('max_abs_diff'), '.0f')} | "
                         f"{_fmt(r.get('peak_alloc_mib'), '.0f')} | {_fmt(r.get('device_mib'), '.0f')} | "
                         f"{_fmt(r.get('build_seconds'))} |")
        lines.append("")
    with_parts = [r for r in rows if r.get("components_ms")]
    if with_parts:
        lines += ["## Per-component times (each part alone, synchronised; ms)", "",
                  "| engine | batch | encoder | unet | decoder | sum | chain median |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(with_parts, key=lambda r: (r["batch"], r["median_ms"])):
            c = r["components_ms"]
            lines.append(f"| {r['name']} | {r['batch']} | {c['encoder']:.2f} | {c['unet']:.2f} | {c['decoder']:.2f} | "
                         f"{sum(c.values()):.2f} | {r['median_ms']:.2f} |")
        engines = [r for r in with_parts if r["kind"] == "engine"]
        if engines:
            best = min(engines, key=lambda r: r["median_ms"] / r["batch"])
            c = best["components_ms"]
            total = sum(c.values())
            lines += ["", f"Fastest engine per image: **{best['name']}** at batch {best['batch']}: "
                      + ", ".join(f"{k} {v:.2f} ms ({100 * v / total:.0f} %)" for k, v in c.items()), ""]
    if skipped:
        lines += ["## Not measured", ""] + [f"- {r['id']}: {r['skipped']}" for r in skipped] + [""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"].values() if not r.get("skipped")]
    tiles = [r for r in rows if r["kind"] != "tiled"]
    tiled = [r for r in rows if r["kind"] == "tiled"]
    fig, axes = plt.subplots(1, 2 if tiled else 1, figsize=(12 if tiled else 8, 5), squeeze=False)
    ax = axes[0][0]
    batches = sorted({r["batch"] for r in tiles})
    names = sorted({r["name"] for r in tiles})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, b in enumerate(batches):
            r = next((r for r in tiles if r["name"] == name and r["batch"] == b), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    side = 4 * result["config"]["tile"]
    ax.set_ylabel(f"{side}² images/s (higher is better)")
    ax.legend(fontsize=7)
    m = result["machine"]
    ax.set_title(f"{result['config']['base']}, {side}² tiles, {m.get('gpu') or m.get('cpu')}", fontsize=9)
    if tiled:
        ax2 = axes[0][1]
        ax2.barh([r["name"] for r in tiled], [r["median_ms"] for r in tiled], color="#55a868")
        ax2.errorbar([r["p90_ms"] for r in tiled], [r["name"] for r in tiled], fmt="|", color="black", markersize=12)
        ax2.set_xlabel("ms per image (median; | = p90)")
        ax2.set_title(f"{result['config']['tiled_size']}² through the tiler", fontsize=9)
        ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out_dir: Path) -> dict[str, Path]:
    from dfosd.core.manifest import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / f"{RESULT_NAME}.{k}" for k in ("json", "md", "png")}
    write_json_atomic(paths["json"], result)
    write_text_atomic(paths["md"], markdown_report(result) + "\n")
    if any(not r.get("skipped") for r in result["rows"].values()):
        try:
            plot(result, paths["png"])
        except Exception as exc:  # a plot must never lose the measurements
            log.warning("plot failed: %s", exc)
    return paths


# ----------------------------------------------------------------------------- command line


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dfosd.bench.gpu_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="synthetic:sd21-base")
    p.add_argument("--ckpt", default=None, help="checkpoint; default a seeded random one in --work")
    p.add_argument("--work", default=".gpu-bench", help="exports, packages, references (reused across commands)")
    p.add_argument("--out", default=None, help="gpu_bench.json/.md/.png (default WORK/results)")
    p.add_argument("--tile", type=int, default=128, help="LR tile (output x4)")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--rows", default=",".join(ROW_KINDS), help=f"subset of {','.join(ROW_KINDS)}")
    p.add_argument("--compile-batches", default="1")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--aoti-precision", choices=["fp32", "fp16"], default=None)
    p.add_argument("--aoti-max-autotune", action="store_true")
    p.add_argument("--tiled-size", type=int, default=2048, help="output side of the tiled row")
    p.add_argument("--tiled-overlap", type=int, default=None, help="LR pixels (default tile/8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tiled-repeats", type=int, default=5)
    p.add_argument("--component-repeats", type=int, default=10)
    p.add_argument("--time-budget-s", type=float, default=0.0, help="start no new row after this many seconds")
    p.add_argument("--merge", nargs="+", default=None, help="only merge these gpu_bench.json files into --out")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    def say(msg: str) -> None:
        print(msg, flush=True)

    try:
        if a.merge:
            paths = write_results(merge_results([Path(x) for x in a.merge]), Path(a.out or "."))
            say(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
            return 0
        cfg = GpuBenchConfig(base=a.base, ckpt=a.ckpt, work_dir=a.work, out_dir=a.out, tile=a.tile,
                             batches=_ints(a.batches), rows=tuple(r.strip() for r in a.rows.split(",") if r.strip()),
                             compile_batches=_ints(a.compile_batches), compile_mode=a.compile_mode,
                             aoti_precision=a.aoti_precision, aoti_max_autotune=a.aoti_max_autotune,
                             tiled_size=a.tiled_size, tiled_overlap=a.tiled_overlap, warmup=a.warmup,
                             repeats=a.repeats, tiled_repeats=a.tiled_repeats, component_repeats=a.component_repeats,
                             time_budget_s=a.time_budget_s)
        bench = GpuBench(cfg, say)
        say(f"machine: {json.dumps(bench.result['machine'])}")
        bench.run()
        say(markdown_report(bench.result))
        say(f"results in {bench.out}")
    except DfosdError as exc:
        say(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
