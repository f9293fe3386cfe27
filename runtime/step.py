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
    def __init__(self, export_dir: str | Path, *, backend: str = "auto", batch: int | None = None,
                 cuda_graph: bool = True, say: Callable[[str], None] = log.info):
        from dfosd.engines.base import select_backend

        self.export = ExportDir(export_dir)
        self.export_dir = self.export.path
        self.manifest = self.export.manifest
        self.batch = int(batch if batch is not None else max(self.export.batches))
        entries = self.export.entries(self.batch)
        cls, self.backend_reason = select_backend(backend)
        if cls.name != "aoti":  # the AOTI backend loads packages, recorded in their own manifest
            unrecorded = unrecorded_files(self.manifest, list(entries.values()))
            if unrecorded:
                raise DfosdError(f"{self.export_dir / MANIFEST_NAME} has no hash record of {', '.join(unrecorded)}: "
                                 "they cannot be checked (was its 'files' list edited?)",
                                 hint="re-run dfosd-export into this directory")
        self.backend = cls()
        say(self.backend_reason)
        self.contracts = self.export.contracts(self.batch)
        self.engines = {n: self.backend.load(self.export_dir, entries[n], self.contracts[n]) for n in COMPONENTS}
        self.buffers = {}
        for c in self.contracts.values():
            for spec in c.inputs + c.outputs:
                self.buffers.setdefault(spec.name, spec.empty(self.backend.device))
        self.buffers[self.contracts["encoder"].inputs[0].name].zero_()
        self._graph = None
        self._use_graph = cuda_graph and self.backend.capturable and self.backend.device == "cuda"

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
        """Fail on NaN/Inf at the float part boundaries (latent, denoised latent).

        The decoder's uint8 cast turns NaN into 0, so a non-finite latent (an fp16 overflow
        in the encoder or UNet of a real checkpoint) would otherwise be saved as a black
        image with status ok. The boundaries are small (latent-sized), so the check is cheap.
        NaN arising inside the decoder itself cannot be seen from its uint8 output."""
        import torch

        for name in ("encoder", "unet"):
            for spec in self.contracts[name].outputs:
                buf = self.buffers[spec.name]
                if buf.is_floating_point() and not bool(torch.isfinite(buf[:b]).all()):
                    fix = ("re-export with --precision fp32 (an fp16 overflow)" if self.precision != "fp32"
                           else "check the checkpoint: the weights make this part overflow")
                    raise NonFiniteOutput(f"the {name} produced NaN or Inf ({spec.name}); the output would be "
                                          f"black, so it is not written", hint=fix)
