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
from typing import Callable, Mapping

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.core.manifest import ExportDir, PartRecord

# The registry: backend name -> (module, its attribute holding the backend class). A new backend is
# one module with its Backend class plus one line here; everything else asks the class.
_MODULES = {"onnxruntime": ("dfosd.engines.onnxruntime_backend", "BACKEND"),
            "openvino": ("dfosd.engines.openvino_backend", "BACKEND"),
            "openvino-bf16": ("dfosd.engines.openvino_backend", "BF16_BACKEND"),
            "tensorrt": ("dfosd.engines.tensorrt_backend", "BACKEND"),
            "aoti": ("dfosd.engines.aoti_backend", "BACKEND")}
BACKENDS = tuple(_MODULES)
BACKEND_CHOICES = ("auto",) + BACKENDS


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
    """One way of running an export's parts, owning its whole life: whether it is usable here
    (``availability``), what it builds from an export ahead of the first run (``prepare``:
    plans, compiled caches, packages), the export precision it runs fast
    (``preferred_precision``), and loading one part (``load``). A new backend is one module
    with such a class plus its line in ``_MODULES``."""
    name: str = ""
    #: True when run() only enqueues GPU work on the current stream, so it can be captured.
    capturable: bool = False
    #: How to make an unusable backend usable (shown with the error).
    install_hint: str = "use --backend onnxruntime (or auto)"
    #: Whether it runs the export's ONNX files (which must then have hash records); False: its own packages.
    reads_onnx: bool = True
    #: Whether dfosd-export --backend NAME prepares it right away (``prepare``); else the first run does.
    prepare_on_export: bool = False
    #: ``auto`` on a CPU machine times the CPU backends that compute the export's own numbers.
    cpu_auto_candidate: bool = False
    #: Faster on some CPUs but approximate: a sentence saying what (offered by name, never picked by auto).
    approximate: str | None = None
    #: Packages whose versions a measured choice between backends is valid for.
    packages: tuple[str, ...] = ()

    def __init__(self, device: str):
        self.device = device

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here?, why) without side effects beyond imports."""

    @classmethod
    def preferred_precision(cls) -> tuple[str, str]:
        """``--precision auto``: the export precision this backend runs fast here, and why."""
        device = cls().device  # CUDA where the backend can use it, else the CPU
        if device == "cuda":
            return "fp16", f"{cls.name} runs on a CUDA GPU, where fp16 is the fast path"
        return "fp32", (f"{cls.name} runs on the CPU, which has no fast fp16 kernels (fp16 was slower than fp32 "
                        "on a 2-core AMD EPYC, BENCHMARKS.md); pass --precision fp16 to export for a GPU elsewhere")

    def prepare(self, export: ExportDir, *, progress: Callable[[str], None] = print, force: bool = False,
                **options) -> None:
        """Build what this backend runs from ``export`` ahead of the first run (``dfosd build``);
        ``force``: rebuild even what is current. Backends with nothing to build say so."""
        check_build_options(self.name, options, ())
        progress(f"{self.name}: nothing to build ahead; it runs {export.path}'s ONNX files as they are")

    @abstractmethod
    def load(self, export: ExportDir, part: PartRecord) -> ComponentEngine:
        """Load one part of ``export`` (its files checked as ``export`` was opened)."""

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def check_build_options(backend: str, options: dict, known: tuple[str, ...]) -> None:
    """Refuse build options another backend takes (``dfosd build --backend X --workspace-gib ...``)."""
    unknown = sorted(k for k, v in options.items() if v is not None and k not in known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise DfosdError(f"{flags} {'does' if len(unknown) == 1 else 'do'} not apply to --backend {backend}",
                         hint=f"drop {flags}, or choose the backend {'it belongs' if len(unknown) == 1 else 'they belong'} to")


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
    return backend_cls.preferred_precision()
