"""The engine interface: every backend loads a part from an export directory and runs
it on named, preallocated buffers.

Buffers are torch tensors (CPU or CUDA) shaped by the part's contract. Running on
caller-owned buffers is what lets the runtime chain parts without copies and capture
the whole step in one CUDA graph where a backend allows it.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError

# openvino-bf16: OpenVINO computing the same graph in bf16 (approximate; never chosen by auto).
BACKENDS = ("onnxruntime", "openvino", "openvino-bf16", "tensorrt", "aoti")
BACKEND_CHOICES = ("auto",) + BACKENDS
# name -> (module, its attribute holding the backend class)
_MODULES = {"onnxruntime": ("dfosd.engines.onnxruntime_backend", "BACKEND"),
            "openvino": ("dfosd.engines.openvino_backend", "BACKEND"),
            "openvino-bf16": ("dfosd.engines.openvino_backend", "BF16_BACKEND"),
            "tensorrt": ("dfosd.engines.tensorrt_backend", "BACKEND"),
            "aoti": ("dfosd.engines.aoti_backend", "BACKEND")}


class ComponentEngine(ABC):
    """One loaded part (encoder, unet or decoder) for one tile batch.

    ``run`` owns what every backend needs: the buffers are checked against the contract
    (name, dtype, shape, contiguity, device) and handed to ``bind`` once, and again only
    when they move; then ``enqueue`` runs the part. Backends implement those two and
    nothing else, so the runtime's static buffers are validated in one place.
    """

    def __init__(self, contract: ComponentContract, device: str | None = None):
        self.contract = contract
        self.device = device  # where the buffers must live ("cpu"/"cuda"); None: anywhere
        self._bound_ptrs: tuple[int, ...] | None = None

    def run(self, inputs: Mapping[str, "object"], outputs: Mapping[str, "object"]) -> None:
        """Read ``inputs`` and write ``outputs`` in place (torch tensors named by the contract)."""
        ptrs = tuple(inputs[s.name].data_ptr() for s in self.contract.inputs) + tuple(
            outputs[s.name].data_ptr() for s in self.contract.outputs)
        if ptrs != self._bound_ptrs:  # static buffers: checked and bound once (CUDA graphs need fixed addresses)
            for specs, tensors in ((self.contract.inputs, inputs), (self.contract.outputs, outputs)):
                for spec in specs:
                    self._check_buffer(spec, tensors[spec.name])
            self.bind(inputs, outputs)
            self._bound_ptrs = ptrs
        self.enqueue(inputs, outputs)

    def _check_buffer(self, spec, t) -> None:
        on = "cuda" if t.is_cuda else t.device.type
        if (tuple(t.shape) != spec.shape or str(t.dtype) != f"torch.{spec.dtype}" or not t.is_contiguous()
                or (self.device is not None and on != self.device)):
            where = f" on {self.device}" if self.device is not None else ""
            raise ValueError(f"{self.contract.stem}: buffer {spec.name} must be a contiguous {spec.dtype} tensor "
                             f"of shape {spec.shape}{where}, got {t.dtype} {tuple(t.shape)} on {t.device}")

    def bind(self, inputs: Mapping[str, "object"], outputs: Mapping[str, "object"]) -> None:
        """Attach checked buffers to the engine (called once per set of buffer addresses)."""

    @abstractmethod
    def enqueue(self, inputs: Mapping[str, "object"], outputs: Mapping[str, "object"]) -> None:
        """Run the part on bound buffers (on a GPU: enqueue on the current stream)."""


class Backend(ABC):
    name: str = ""
    #: True when run() only enqueues GPU work on the current stream, so it can be captured.
    capturable: bool = False
    #: How to make an unusable backend usable (shown with the error).
    install_hint: str = "use --backend onnxruntime (or auto)"

    def __init__(self, device: str):
        self.device = device

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here?, why) without side effects beyond imports."""

    @abstractmethod
    def load(self, export_dir: Path, entry: dict, contract: ComponentContract,
             manifest: dict | None = None) -> ComponentEngine:
        """Load one part from its manifest entry. ``manifest``: the export's manifest.json as the
        caller already read it (None: the backend reads it where it needs it)."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def backend_class(name: str) -> type[Backend]:
    if name not in _MODULES:
        raise DfosdError(f"unknown backend {name!r}", hint=f"choose one of {', '.join(BACKEND_CHOICES)}")
    module, attr = _MODULES[name]
    if importlib.util.find_spec(module) is None:
        raise DfosdError(f"the {name} backend is not part of this dfosd build",
                         hint="use --backend onnxruntime")
    return getattr(importlib.import_module(module), attr)


def tensorrt_importable() -> bool:
    # find_spec does not import tensorrt, so asking is cheap and loads no CUDA library.
    return importlib.util.find_spec("tensorrt") is not None


def select_backend(name: str = "auto") -> tuple[type[Backend], str]:
    """The backend class to use and a sentence saying why (printed by the CLIs)."""
    if name == "auto":
        if not tensorrt_importable():
            return backend_class("onnxruntime"), "auto picked onnxruntime: the tensorrt package is not installed"
        if not cuda_available():
            return backend_class("onnxruntime"), "auto picked onnxruntime: tensorrt is installed but no CUDA GPU is visible"
        try:
            cls = backend_class("tensorrt")
        except DfosdError as exc:
            return backend_class("onnxruntime"), f"auto picked onnxruntime: {exc.message}"
        ok, why = cls.availability()
        if ok:
            return cls, f"auto picked tensorrt: {why}"
        return backend_class("onnxruntime"), f"auto picked onnxruntime: tensorrt unusable ({why})"
    cls = backend_class(name)
    ok, why = cls.availability()
    if not ok:
        raise DfosdError(f"backend {name} is not usable here: {why}", hint=cls.install_hint)
    return cls, f"{name} as requested: {why}"


def auto_precision(backend_cls: type[Backend]) -> tuple[str, str]:
    """``--precision auto``: the export precision the chosen backend runs fast, and a sentence saying why."""
    if backend_cls.name == "tensorrt":
        return "fp16", "TensorRT runs on a CUDA GPU, where fp16 is the fast path"
    if backend_cls.name == "openvino-bf16":
        return "fp32", "openvino-bf16 computes the fp32 graph in bf16 (bf16 keeps fp32's range; fp16 files would not)"
    device = backend_cls().device  # onnxruntime / aoti: CUDA where they can use it, else the CPU
    if device == "cuda":
        return "fp16", f"{backend_cls.name} runs on a CUDA GPU, where fp16 is the fast path"
    return "fp32", (f"{backend_cls.name} runs on the CPU, which has no fast fp16 kernels (fp16 was slower than fp32 "
                    "on a 2-core AMD EPYC, BENCHMARKS.md); pass --precision fp16 to export for a GPU elsewhere")
