"""ONNX Runtime backend: CPU EP everywhere, CUDA EP when onnxruntime-gpu and a GPU exist.

Buffers are bound with IOBinding to the caller's torch tensors, so ONNX Runtime reads
and writes the runtime's static buffers directly (no per-call allocation or copy),
on the CPU as on the GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.engines.base import Backend, ComponentEngine, cuda_available
from dfosd.engines.machine import RuntimeCache, cpu_threads, machine_identity

log = logging.getLogger(__name__)

# CPU only: graphs optimized at ORT_ENABLE_ALL hold CPU-specific layouts (NCHWc), so they are
# kept per export with the CPU identity and ORT version, and rebuilt when either changes.
OPTIMIZED_DIR = "onnxruntime-optimized"
OPTIMIZED_RECORD = "onnxruntime_optimized"


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

    def __init__(self, device: str | None = None, *, threads: int = 0, save_optimized: bool = True):
        if device is None:
            device = "cuda" if ("CUDAExecutionProvider" in _providers() and cuda_available()) else "cpu"
        super().__init__(device)
        # Explicit, not ORT's guess: physical cores (hyper-threads slow matmul-bound graphs down);
        # on a GPU the CPU threads only run the few CPU-side nodes.
        self.threads = threads or cpu_threads()
        self.save_optimized = save_optimized
        self._cache = RuntimeCache(OPTIMIZED_DIR, OPTIMIZED_RECORD,
                                   ("*.opt.onnx", "*.opt.onnx.data", "*.opt.tmp.onnx"), log)

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

    def optimized_record(self, manifest: dict) -> dict:
        import onnxruntime as ort

        # The graphs' own hashes too: an optimized graph is a copy of its ONNX, and must go when that
        # file changes even if the export's build key did not (a file replaced by hand).
        sources = {name: rec.get("sha256") for name, rec in sorted(manifest.get("files", {}).items())}
        return {"onnxruntime": ort.__version__, "machine": machine_identity(), "build_key": manifest.get("build_key"),
                "sources": sources, "options": {"level": "ORT_ENABLE_ALL", "intra_op_threads": self.threads}}

    def _optimized_path(self, export_dir: Path, entry: dict, manifest: dict | None) -> tuple[Path | None, bool]:
        """(where the optimized graph of this part lives, whether it is there and current)."""
        if self.device != "cpu" or not self.save_optimized:
            return None, False
        folder = self._cache.folder(export_dir, self.optimized_record, manifest)
        if folder is None:
            return None, False
        path = folder / f"{Path(entry['onnx']).stem}.opt.onnx"
        return path, path.is_file()

    def load(self, export_dir: Path, entry: dict, contract: ComponentContract,
             manifest: dict | None = None) -> OrtComponent:
        import onnxruntime as ort

        path = Path(export_dir) / entry["onnx"]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else [
            "CPUExecutionProvider"]
        optimized, current = self._optimized_path(export_dir, entry, manifest)
        opts = self.session_options()
        try:
            if current:
                # Optimized here before, for this CPU and ORT: load it as it is (graph
                # optimization of the full-size UNet is most of its load time).
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                return OrtComponent(ort.InferenceSession(str(optimized), opts, providers=providers), contract,
                                    self.device)
            tmp = None
            if optimized is not None:
                tmp = optimized.with_name(optimized.name.replace(".opt.onnx", ".opt.tmp.onnx"))
                opts.optimized_model_filepath = str(tmp)
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                              optimized.name + ".data")
                opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                              "1024")
            session = ort.InferenceSession(str(path), opts, providers=providers)
            if tmp is not None and tmp.is_file():
                tmp.replace(optimized)  # the rename commits it: a half-written graph is never loaded
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise DfosdError(f"onnxruntime could not load {optimized if current else path}: {exc}",
                             hint="re-run dfosd-export to rewrite the directory") from exc
        return OrtComponent(session, contract, self.device)

    def describe(self) -> str:
        return f"onnxruntime ({'CUDA' if self.device == 'cuda' else 'CPU'} execution provider, {self.threads} threads)"


BACKEND = OnnxRuntimeBackend
