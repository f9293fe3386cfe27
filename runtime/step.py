"""The lean runtime: three engines chained on static buffers for one tile batch.

lr_image -> [encoder] -> latent -> [unet] -> denoised_latent -> [decoder] -> sr_image

Every buffer is allocated once from the component contracts; a call copies the LR
tiles into ``lr_image``, runs the chain, and reads ``sr_image``. Backends whose run
only enqueues GPU work (``Backend.capturable``) get the whole chain captured in one
CUDA graph after a warm-up run; others run it eagerly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from dfosd.core.errors import DfosdError
from dfosd.core.manifest import ExportDir
from dfosd.core.manifest_check import unrecorded_files
from dfosd.core.vocab import COMPONENTS, MANIFEST_NAME

log = logging.getLogger(__name__)


class NonFiniteOutput(DfosdError):
    """A part produced NaN or Inf: the image would come out black (or partly), so it fails instead."""


class OneStepRunner:
    """``backend``: ``auto``, a backend name, or one per part (``encoder=openvino,unet=onnxruntime,...``
    or a dict); see runtime/backend_choice.py. ``remeasure``: time auto's candidates again
    even when the manifest holds a choice made on this machine."""

    def __init__(self, export_dir: str | Path, *, backend: str | dict = "auto", batch: int | None = None,
                 cuda_graph: bool = True, say: Callable[[str], None] = log.info, remeasure: bool = False):
        self.export = ExportDir(export_dir)
        self.export_dir = self.export.path
        self._cuda_graph = cuda_graph
        self.manifest = self.export.manifest
        self.batch = int(batch if batch is not None else max(self.export.batches))
        self.entries = self.export.entries(self.batch)
        self.parts = self.export.parts(self.batch)
        self._check_recorded(backend)
        self.contracts = self.export.contracts(self.batch)
        per_part, self.engines, self.plan = self._resolve(backend, say, remeasure)
        for name in COMPONENTS:
            if name not in self.engines:
                self.engines[name] = per_part[name].load(self.export, self.parts[name])
        self._setup(per_part)

    def _check_recorded(self, backend) -> None:
        """The ONNX files the chosen backends read must have a hash record (a backend that does
        not read ONNX, AOTI, loads packages recorded in their own manifest)."""
        from dfosd.engines.base import backend_class
        from dfosd.runtime.backend_choice import parse_backend_spec

        spec = parse_backend_spec(backend) if isinstance(backend, str) else dict(backend)

        def reads_onnx(name: str) -> bool:
            return name == "auto" or backend_class(name).reads_onnx

        parts = [p for p in COMPONENTS if reads_onnx(spec.get(p) if isinstance(spec, dict) else spec)]
        unrecorded = unrecorded_files(self.manifest, [self.entries[p] for p in parts])
        if unrecorded:
            raise DfosdError(f"{self.export_dir / MANIFEST_NAME} has no hash record of {', '.join(unrecorded)}: "
                             "they cannot be checked (was its 'files' list edited?)",
                             hint="re-run dfosd-export into this directory")

    def _resolve(self, backend, say, remeasure):
        """(backend instance per part, engines loaded while choosing, the plan)."""
        from dfosd.engines.base import backend_class, select_backend
        from dfosd.runtime.backend_choice import (
            BackendPlan,
            approximate_hint,
            cpu_candidates,
            measured_choice,
            parse_backend_spec,
        )

        spec = parse_backend_spec(backend) if isinstance(backend, str) else dict(backend)
        if isinstance(spec, dict):
            parse_backend_spec(",".join(f"{p}={n}" for p, n in spec.items()))  # same checks for a dict
            instances = {}
            for name in sorted(set(spec.values())):
                cls, _ = select_backend(name)
                instances[name] = cls()
            plan = BackendPlan(dict(spec), "per part as requested")
            self.backend_reason = f"{plan.reason}: {plan.summary()}"
            say(self.backend_reason)
            return {p: instances[spec[p]] for p in COMPONENTS}, {}, plan
        cls, why = select_backend(spec)
        single = cls()
        cpu_auto = spec == "auto" and single.name == "onnxruntime" and single.device == "cpu"
        candidates = cpu_candidates() if cpu_auto else []
        if len(candidates) < 2:
            plan = BackendPlan({p: single.name for p in COMPONENTS}, why)
            self.backend_reason = why
            say(why)
            return {p: single for p in COMPONENTS}, {}, plan
        instances = {n: (single if n == single.name else backend_class(n)()) for n in candidates}
        plan, engines = measured_choice(self.export, self.batch, self.contracts, instances,
                                        lambda b, part: b.load(self.export, self.parts[part]), say=say,
                                        remeasure=remeasure)
        self.backend_reason = f"{plan.reason}: {plan.summary()}"
        say(self.backend_reason)
        for line in plan.timing_lines():
            say(line)
        hint = approximate_hint()
        if hint:
            say(hint)
        return {p: instances[plan.names[p]] for p in COMPONENTS}, engines, plan

    @classmethod
    def from_engines(cls, export_dir: str | Path, batch: int, parts: dict[str, tuple[object, object]],
                     plan) -> "OneStepRunner":
        """A runner over engines already loaded elsewhere (the bench's per-part row reuses the
        single-backend runners' engines instead of loading every part a second time)."""
        self = cls.__new__(cls)
        self.export = ExportDir(export_dir, check="none")  # the engines' own loads checked the files
        self.export_dir = self.export.path
        self._cuda_graph = True
        self.manifest = self.export.manifest
        self.batch = int(batch)
        self.entries = self.export.entries(self.batch)
        self.parts = self.export.parts(self.batch)
        self.contracts = self.export.contracts(self.batch)
        self.engines = {n: parts[n][1] for n in COMPONENTS}
        self.plan = plan
        self.backend_reason = f"{plan.reason}: {plan.summary()}"
        self._setup({n: parts[n][0] for n in COMPONENTS})
        return self

    def _setup(self, per_part: dict) -> None:
        from dfosd.runtime.backend_choice import PartBackends

        distinct = {id(b): b for b in per_part.values()}
        self.backend = next(iter(distinct.values())) if len(distinct) == 1 else PartBackends(per_part, self.plan)
        self.buffers = {}
        for c in self.contracts.values():
            for spec in c.inputs + c.outputs:
                self.buffers.setdefault(spec.name, spec.empty(self.backend.device))
        self.buffers[self.contracts["encoder"].inputs[0].name].zero_()
        self._graph = None
        self._use_graph = self._cuda_graph and self.backend.capturable and self.backend.device == "cuda"

    @property
    def tile(self) -> int:
        return self.export.tile

    @property
    def scale(self) -> int:
        return self.export.upscale

    @property
    def precision(self) -> str:
        return self.export.precision

    @property
    def graph_captured(self) -> bool:
        """True once the whole step runs as one replayed CUDA graph."""
        return self._graph is not None and self._use_graph

    def run_chain(self) -> None:
        for name in COMPONENTS:
            c = self.contracts[name]
            self.engines[name].run({s.name: self.buffers[s.name] for s in c.inputs},
                                   {s.name: self.buffers[s.name] for s in c.outputs})

    def _run(self) -> None:
        if not self._use_graph:
            self.run_chain()
            return
        import torch

        if self._graph is None:
            try:
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    self.run_chain()  # warm-up: lazy allocations must not be captured
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.run_chain()
                self._graph = graph
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed (%s); running without it", exc)
                self._use_graph = False
                self.run_chain()
                return
        self._graph.replay()

    def __call__(self, lr_tiles):
        """uint8 [b,3,tile,tile] with b <= batch -> uint8 [b,3,tile*scale,tile*scale] (CPU)."""
        import torch

        b = lr_tiles.shape[0]
        lr = self.buffers[self.contracts["encoder"].inputs[0].name]
        if tuple(lr_tiles.shape[1:]) != tuple(lr.shape[1:]) or b > lr.shape[0] or lr_tiles.dtype != torch.uint8:
            raise ValueError(f"expected uint8 tiles [<= {lr.shape[0]}, {', '.join(map(str, lr.shape[1:]))}], "
                             f"got {lr_tiles.dtype} {tuple(lr_tiles.shape)}")
        lr[:b].copy_(lr_tiles)
        if b < lr.shape[0]:
            lr[b:].zero_()  # a partial batch: pad, and ignore the padded outputs
        self._run()
        self._check_finite(b)
        out = self.buffers[self.contracts["decoder"].outputs[0].name]
        return out[:b].to("cpu", copy=True)

    def _check_finite(self, b: int) -> None:
        """Fail on NaN/Inf at the float part boundaries (latent, denoised latent) and where the
        decoder flags a tile whose values were non-finite before its cast to uint8.

        The decoder's uint8 cast turns NaN into 0, so a non-finite value (an fp16 overflow of a
        real checkpoint, or an 8-bit engine's) would otherwise be saved as a black image with
        status ok. The boundaries are small (latent-sized) and the flag is one byte per tile,
        so the check is cheap. Exports made before the flag existed have only the boundaries."""
        import torch

        from dfosd.core.contracts import nonfinite_flag

        fix = ("re-export with --precision fp32 (an fp16 overflow; `dfosd verify --fp16-storage` finds "
               "where)" if self.precision != "fp32" else "check the checkpoint: the weights make this part overflow")
        for name in ("encoder", "unet"):
            for spec in self.contracts[name].outputs:
                buf = self.buffers[spec.name]
                if buf.is_floating_point() and not bool(torch.isfinite(buf[:b]).all()):
                    raise NonFiniteOutput(f"the {name} produced NaN or Inf ({spec.name}); the output would be "
                                          f"black, so it is not written", hint=fix)
        flag = nonfinite_flag(self.contracts["decoder"])
        if flag is not None:
            bad = torch.nonzero(self.buffers[flag.name][:b].to("cpu")).flatten().tolist()
            if bad:
                raise NonFiniteOutput(f"the decoder produced NaN or Inf before its uint8 cast ({flag.name}, tile "
                                      f"{', '.join(map(str, bad))} of this batch); the output would be black, so it "
                                      "is not written", hint=fix)
