"""ONNX Runtime backend: CPU EP everywhere, CUDA EP when onnxruntime-gpu and a GPU exist.

Buffers are bound with IOBinding to the caller's torch tensors, so ONNX Runtime reads
and writes the runtime's static buffers directly (no per-call allocation or copy),
on the CPU as on the GPU.
"""

from __future__ import annotations

from pathlib import Path
from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.engines.base import Backend, ComponentEngine, cuda_available


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

    def __init__(self, device: str | None = None, *, threads: int = 0):
        if device is None:
            device = "cuda" if ("CUDAExecutionProvider" in _providers() and cuda_available()) else "cpu"
        super().__init__(device)
        self.threads = threads

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
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return opts

    def load(self, export_dir: Path, entry: dict, contract: ComponentContract) -> OrtComponent:
        import onnxruntime as ort

        path = Path(export_dir) / entry["onnx"]
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else [
            "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), self.session_options(), providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise DfosdError(f"onnxruntime could not load {path}: {exc}",
                             hint="re-run dfosd-export to rewrite the directory") from exc
        return OrtComponent(session, contract, self.device)

    def describe(self) -> str:
        return f"onnxruntime ({'CUDA' if self.device == 'cuda' else 'CPU'} execution provider)"


BACKEND = OnnxRuntimeBackend
