"""ONNX Runtime backend: CPU EP everywhere, CUDA EP when onnxruntime-gpu and a GPU exist.

Buffers are bound with IOBinding to the caller's torch tensors, so ONNX Runtime reads
and writes the runtime's static buffers directly (no per-call allocation or copy),
on the CPU as on the GPU.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.core.manifest import ExportDir, PartRecord
from dfosd.engines.base import Backend, ComponentEngine, check_build_options, cuda_available
from dfosd.engines.cache import CacheFolder, CacheFolders
from dfosd.engines.machine import cpu_threads, machine_identity

log = logging.getLogger(__name__)

# CPU only: graphs optimized at ORT_ENABLE_ALL hold CPU-specific layouts (NCHWc), so they are
# kept per export with the CPU identity and ORT version, and rebuilt when either changes
# (engines/cache.py: each file recorded with its hash and checked at load).
OPTIMIZED_DIR = "onnxruntime-optimized"
OPTIMIZED_RECORD = "onnxruntime_optimized"


def _optimized_names(stem: str) -> list[str]:
    return [f"{stem}.opt.onnx", f"{stem}.opt.onnx.data"]  # the graph first: it is what is loaded


def _stage_optimized(opts, cache: CacheFolder, stem: str) -> Path:
    """Have ORT write the optimized graph into a private staging folder inside the cache: the
    files reach their names only by rename, so a half-written graph is never loaded."""
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.staging.", dir=cache.folder))
    graph, data = _optimized_names(stem)
    opts.optimized_model_filepath = str(staging / graph)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return staging


def _place_optimized(staging: Path, cache: CacheFolder, stem: str) -> list[str]:
    """Move the staged files into the cache (data before graph) and return their names."""
    names = [n for n in _optimized_names(stem) if (staging / n).is_file()]
    for name in sorted(names, key=lambda n: n.endswith(".opt.onnx")):
        (staging / name).replace(cache.path(name))
    return names


def _providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OrtComponent(ComponentEngine):
    def __init__(self, session, contract: ComponentContract, device: str):
        super().__init__(contract)  # IOBinding takes CPU and CUDA buffers alike
        self.session = session
        self.ort_device = device
        self._binding = None
        got = {i.name for i in session.get_inputs()} | {o.name for o in session.get_outputs()}
        want = {s.name for s in contract.inputs + contract.outputs}
        if got != want:
            raise DfosdError(f"{contract.stem}: the ONNX file's tensors {sorted(got)} differ from its contract "
                             f"{sorted(want)}", hint="re-run dfosd-export into a clean directory")

    def bind(self, inputs, outputs) -> None:
        binding = self.session.io_binding()
        for specs, tensors, bind in ((self.contract.inputs, inputs, binding.bind_input),
                                     (self.contract.outputs, outputs, binding.bind_output)):
            for spec in specs:
                t = tensors[spec.name]
                bind(spec.name, "cuda" if t.is_cuda else "cpu", t.device.index or 0, spec.numpy_dtype,
                     list(spec.shape), t.data_ptr())
        self._binding = binding

    def enqueue(self, inputs, outputs) -> None:
        if self.ort_device == "cuda":
            self._binding.synchronize_inputs()
        self.session.run_with_iobinding(self._binding)
        if self.ort_device == "cuda":
            self._binding.synchronize_outputs()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    cpu_auto_candidate = True
    packages = ("onnxruntime", "onnxruntime-gpu")

    def __init__(self, device: str | None = None, *, threads: int = 0, save_optimized: bool = True):
        if device is None:
            device = "cuda" if ("CUDAExecutionProvider" in _providers() and cuda_available()) else "cpu"
        super().__init__(device)
        # Explicit, not ORT's guess: physical cores (hyper-threads slow matmul-bound graphs down);
        # on a GPU the CPU threads only run the few CPU-side nodes.
        self.threads = threads or cpu_threads()
        self.save_optimized = save_optimized
        self._caches = CacheFolders(OPTIMIZED_DIR, OPTIMIZED_RECORD, log)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            providers = _providers()
        except ImportError as exc:
            return False, f"onnxruntime does not import ({exc})"
        if "CUDAExecutionProvider" in providers and cuda_available():
            return True, "onnxruntime CUDA execution provider with a visible GPU"
        return True, "onnxruntime CPU execution provider" + (
            "" if "CUDAExecutionProvider" in providers else " (install dfosd[gpu] for the CUDA provider)")

    def session_options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # fp16 graphs on the CPU EP warn per node; errors still raise
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1  # one chain of parts, run sequentially: no parallel branches to feed
        # ORT's idle workers spin-wait for the next op by default. Between runs they then burn the
        # cores the next part needs when that part runs on another runtime (per-part backends) or
        # in another process (a shared machine): blocking costs a wake-up per op, microseconds.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return opts

    def optimized_identity(self, export: ExportDir) -> dict:
        import onnxruntime as ort

        # The graphs' own hashes too: an optimized graph is a copy of its ONNX, and must go when that
        # file changes even if the export's build key did not (a file replaced by hand).
        sources = {name: rec.get("sha256") for name, rec in sorted(export.files.items())}
        return {"onnxruntime": ort.__version__, "machine": machine_identity(), "build_key": export.build_key,
                "sources": sources, "options": {"level": "ORT_ENABLE_ALL", "intra_op_threads": self.threads}}

    def load(self, export: ExportDir, part: PartRecord) -> OrtComponent:
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else [
            "CPUExecutionProvider"]
        cache = None
        if self.device == "cpu" and self.save_optimized:
            cache = self._caches.get(export, self.optimized_identity)
            if cache.lookup(part.stem) is not None:
                optimized = cache.path(_optimized_names(part.stem)[0])
                # Optimized here before, for this CPU and ORT, and intact: load it as it is (graph
                # optimization of the full-size UNet is most of its load time).
                opts = self.session_options()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                try:
                    return OrtComponent(ort.InferenceSession(str(optimized), opts, providers=providers),
                                        part.contract, self.device)
                except Exception as exc:  # recorded and intact, yet unloadable: rebuilt like a damaged one
                    log.warning("%s: onnxruntime could not load it (%s): rebuilding it", optimized,
                                str(exc).strip().splitlines()[0])
                    cache.forget(part.stem)
        path = export.file(part.onnx)
        opts = self.session_options()
        staging = None
        try:
            if cache is not None and cache.usable:
                try:
                    staging = _stage_optimized(opts, cache, part.stem)
                except OSError as exc:  # a read-only export: run from the ONNX file, cache nothing
                    log.warning("%s: not saving the optimized graph (%s)", cache.folder, exc)
            session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise DfosdError(f"onnxruntime could not load {path}: {exc}",
                             hint="re-run dfosd-export to rewrite the directory") from exc
        if staging is not None:
            try:
                cache.commit(part.stem, _place_optimized(staging, cache, part.stem))
            except OSError as exc:  # the session runs; only the cache is not kept
                log.warning("%s: not saving the optimized graph (%s)", cache.folder, exc)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return OrtComponent(session, part.contract, self.device)

    def prepare(self, export: ExportDir, *, progress=log.info, force: bool = False, **options) -> None:
        """On the CPU: write every part's optimized graph now (else the first run does)."""
        check_build_options(self.name, options, ())
        if self.device != "cpu" or not self.save_optimized:
            progress(f"{self.name}: nothing to build ahead on {self.device}; it runs the ONNX files as they are")
            return
        for part in export.all_parts():
            if force:
                self._caches.get(export, self.optimized_identity).forget(part.stem)
            self.load(export, part)
            progress(f"{self.name}: {part.onnx} optimized graph ready in {export.file(OPTIMIZED_DIR)}")

    def describe(self) -> str:
        return f"onnxruntime ({'CUDA' if self.device == 'cuda' else 'CPU'} execution provider, {self.threads} threads)"


BACKEND = OnnxRuntimeBackend
