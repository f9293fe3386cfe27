"""The GPU bench's rows: eager, torch.compile, AOTInductor, onnxruntime and the tiled image.

Each ``run_<kind>(bench)`` adds its rows to ``bench`` (a ``GpuBench``), which saves the
results after every row, so a command cut short by its time limit keeps what it measured.
A row that cannot be built is recorded as skipped with the reason; the other rows go on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from dfosd.bench.gpu_harness import tile_inputs, tiled_input
from dfosd.bench.measure import free_memory, time_runs

if TYPE_CHECKING:
    from dfosd.bench.gpu_harness import GpuBench


def run_eager(b: GpuBench) -> None:
    precisions = ["fp32"] + (["fp16"] if b.cuda else [])
    if not b.cuda:
        b.skip("eager-fp16", "eager PyTorch fp16", "no CUDA GPU: CPU half-precision convolutions are not a "
                  "meaningful baseline")
    for prec in precisions:
        for batch in b.cfg.batches:
            row_id = f"eager-{prec}/b{batch}"
            if b.over_budget():
                b.skip(row_id, f"eager PyTorch {prec}", "time budget spent", batch=batch)
                continue
            b.memory.start()
            model = b.eager(prec)
            attn = sorted({type(p).__name__ for p in model.unet.unet.attn_processors.values()})
            x = tile_inputs(b.cfg.tile, batch)
            step = b.eager_step(prec)
            m = time_runs(lambda: step(x), warmup=b.cfg.warmup, repeats=b.cfg.repeats)
            mem = b.memory.read()
            ref = b.reference(batch) if prec != "fp32" else m.output
            if prec == "fp32":  # this run is the reference: keep it for later commands
                b.keep_reference(f"b{batch}", m.output)
            comps = b.components_of_eager(prec, batch) if prec == "fp16" else None
            b.row(row_id, f"eager PyTorch {prec}", kind="eager", precision=prec, batch=batch,
                     out_side=4 * b.cfg.tile, m=m, ref=ref, mem=mem, attention=attn, components_ms=comps)
        if prec == "fp32" and "tiled" in b.cfg.rows and not b.over_budget():
            b.tiled_reference(max(b.cfg.batches))  # the fp32 model is at hand: make the reference now
        b.drop_eager(prec)  # each row group measures its own memory


def run_compile(b: GpuBench) -> None:
    import torch

    prec = "fp16" if b.cuda else "fp32"
    for batch in b.cfg.compile_batches:
        row_id = f"compile-{b.cfg.compile_mode}-{prec}/b{batch}"
        name = f"torch.compile {b.cfg.compile_mode} {prec}"
        if b.over_budget():
            b.skip(row_id, name, "time budget spent", batch=batch)
            continue
        ref = b.reference(batch)
        torch._dynamo.reset()
        b.memory.start()
        model = b.eager(prec)
        compiled = torch.compile(model, mode=b.cfg.compile_mode)
        x = tile_inputs(b.cfg.tile, batch)

        def step():
            with torch.inference_mode():
                return compiled(x.to(b.dev)).cpu()

        t = time.perf_counter()
        try:
            step()
        except Exception as exc:  # report a compiler failure as a row, keep the other rows
            b.skip(row_id, name, f"compile failed: {type(exc).__name__}: {str(exc)[:300]}", batch=batch)
            continue
        compile_s = time.perf_counter() - t
        m = time_runs(step, warmup=b.cfg.warmup, repeats=b.cfg.repeats)
        b.row(row_id, name, kind="compile", precision=prec, batch=batch, out_side=4 * b.cfg.tile, m=m,
                 ref=ref, mem=b.memory.read(), build_seconds=round(compile_s, 1))
        compiled = None  # noqa: F841  (release before the next row)
        torch._dynamo.reset()
        b.drop_eager(prec)


def run_aoti(b: GpuBench) -> None:
    prec = b.aoti_precision
    for batch in b.cfg.batches:
        graph_id, plain_id = f"aoti-{prec}-graph/b{batch}", f"aoti-{prec}/b{batch}"
        if b.over_budget():
            b.skip(graph_id, f"aoti {prec} (one CUDA graph)", "time budget spent", batch=batch)
            continue
        ref = b.reference(batch)
        x = tile_inputs(b.cfg.tile, batch)
        try:
            res, build_s = b.aoti_build(batch)
            b.memory.start()
            runner = b.aoti_runner(res, batch, cuda_graph=True)
        except Exception as exc:
            b.skip(graph_id, f"aoti {prec}", f"build/load failed: {type(exc).__name__}: {str(exc)[:400]}",
                      batch=batch)
            continue
        extra = {"build_seconds": build_s, "reused_packages": res.reused,
                 "channels_last": res.build["channels_last"], "max_autotune": res.build["max_autotune"]}
        if b.cuda:
            m = time_runs(lambda: runner(x), warmup=b.cfg.warmup, repeats=b.cfg.repeats)
            captured = runner.graph_captured
            b.row(graph_id, f"aoti {prec} (one CUDA graph)", kind="engine", precision=prec, batch=batch,
                     out_side=4 * b.cfg.tile, m=m, ref=ref, mem=b.memory.read(), cuda_graph=captured,
                     **extra, **({} if captured else {"note": "capture failed: ran without the graph"}))
            runner = None
            free_memory()
            b.memory.start()
            runner = b.aoti_runner(res, batch, cuda_graph=False)
        else:
            b.skip(graph_id, f"aoti {prec} (one CUDA graph)", "no CUDA GPU: CUDA graphs need one", batch=batch)
        m = time_runs(lambda: runner(x), warmup=b.cfg.warmup, repeats=b.cfg.repeats)
        mem = b.memory.read()
        b.row(plain_id, f"aoti {prec} (no graph)", kind="engine", precision=prec, batch=batch,
                 out_side=4 * b.cfg.tile, m=m, ref=ref, mem=mem, cuda_graph=False,
                 components_ms=b.components_of_runner(runner), **extra)
        runner = None  # noqa: F841
        free_memory()


def run_onnxruntime(b: GpuBench) -> None:
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError as exc:
        b.skip("onnxruntime", "onnxruntime", f"onnxruntime does not import ({exc})")
        return
    if b.cuda and "CUDAExecutionProvider" not in providers:
        b.skip("onnxruntime", "onnxruntime", f"onnxruntime {ort.__version__} has no CUDA execution provider "
                  f"(providers {providers}); carry an onnxruntime-gpu wheel to time it")
        return
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    prec = "fp16" if b.cuda else "fp32"
    for batch in b.cfg.batches:
        row_id = f"onnxruntime-{prec}/b{batch}"
        if b.over_budget():
            b.skip(row_id, f"onnxruntime {prec}", "time budget spent", batch=batch)
            continue
        ref = b.reference(batch)
        t = time.perf_counter()
        folder = export_checkpoint(b.ckpt_path, b.cfg.base, b.work / f"onnx-{prec}-tile{b.cfg.tile}-b{batch}",
                                   ExportConfig(precision=prec, tile=b.cfg.tile, batches=(batch,)),
                                   progress=b.say, base=b.base).out_dir  # the base already loaded
        build_s = time.perf_counter() - t
        b.memory.start()
        runner = OneStepRunner(folder, backend="onnxruntime", batch=batch, say=b.say)
        x = tile_inputs(b.cfg.tile, batch)
        m = time_runs(lambda: runner(x), warmup=b.cfg.warmup, repeats=b.cfg.repeats)
        b.row(row_id, f"onnxruntime {prec} ({runner.backend.device})", kind="engine", precision=prec, batch=batch,
                 out_side=4 * b.cfg.tile, m=m, ref=ref, mem=b.memory.read(),
                 components_ms=b.components_of_runner(runner), build_seconds=round(build_s, 1))
        runner = None  # noqa: F841
        free_memory()


def run_tiled(b: GpuBench) -> None:
    size, batch = b.cfg.tiled_size, max(b.cfg.batches)
    try:
        from dfosd.runtime.tiling import plan_tiles, upscale_tiled
    except ImportError as exc:
        b.skip(f"tiled{size}", f"tiled {size}²", f"runtime.tiling is not available here ({exc})")
        return
    image = tiled_input(size // 4)
    tiles = len(plan_tiles(size // 4, size // 4, b.tiling(batch)))
    extra = {"tiles": tiles, "tile_overlap_lr": b.cfg.overlap}
    ref = b.tiled_reference(batch)
    steps: list[tuple[str, str, str, Callable[[], tuple[Callable, Callable]]]] = []
    if b.cuda:
        steps.append((f"tiled{size}-eager-fp16/b{batch}", f"tiled {size}² eager PyTorch fp16", "fp16",
                      lambda: (b.eager_step("fp16"), lambda: b.drop_eager("fp16"))))
    else:
        steps.append((f"tiled{size}-eager-fp32/b{batch}", f"tiled {size}² eager PyTorch fp32", "fp32",
                      lambda: (b.eager_step("fp32"), lambda: b.drop_eager("fp32"))))

    def aoti_step():
        res, _ = b.aoti_build(batch)
        return b.aoti_runner(res, batch, cuda_graph=True), free_memory

    prec = b.aoti_precision
    steps.append((f"tiled{size}-aoti-{prec}{'-graph' if b.cuda else ''}/b{batch}",
                  f"tiled {size}² aoti {prec}{' (one CUDA graph)' if b.cuda else ''}", prec, aoti_step))
    for row_id, name, p, make in steps:
        if b.over_budget():
            b.skip(row_id, name, "time budget spent", batch=batch)
            continue
        try:
            step, release = make()
        except Exception as exc:
            b.skip(row_id, name, f"build/load failed: {type(exc).__name__}: {str(exc)[:400]}", batch=batch)
            continue
        b.memory.start()  # after the build: the peak still counts the weights, which stay allocated
        m = time_runs(lambda: upscale_tiled(image, step, b.tiling(batch)), warmup=1,
                    repeats=b.cfg.tiled_repeats)
        b.row(row_id, name, kind="tiled", precision=p, batch=batch, out_side=size, m=m, ref=ref,
                 mem=b.memory.read(), images=1, **extra)
        step = None  # noqa: F841
        release()
