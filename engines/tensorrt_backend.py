"""TensorRT backend: the plans built by ``engines.tensorrt_build``, run on the runner's buffers.

Per part one runtime, one engine and one execution context. The three contexts share one
activation buffer (``ExecutionContextAllocationStrategy.USER_MANAGED``), sized to the
largest ``device_memory_size_v2``: the parts run one after another on one stream, so they
never need their scratch memory at the same time. Tensors are bound by name with
``set_tensor_address`` to the runner's static buffers, and ``run`` only enqueues
``execute_async_v3`` on torch's current stream, so ``runtime/step.py`` can capture the
three enqueues in one CUDA graph (``capturable``).

Device memory (the activation buffer) is held as torch CUDA tensors, not cudaMalloc'd
through cuda-python: the runner already owns its I/O buffers as torch tensors and
``torch.cuda.graph`` captures against torch's allocator and streams, so one allocator owns
everything the graph touches, its lifetime follows the Python objects, and no second
CUDA binding is needed. Torch's CUDA allocations are 512-byte aligned (TensorRT needs 256).

Before a plan is deserialized its manifest is compared with the running system (TensorRT
major, GPU SM, CUDA major): a plan from another system is refused with the command that
rebuilds it, instead of failing inside TensorRT.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError, problems_error
from dfosd.core.manifest import ExportDir, PartRecord
from dfosd.engines.base import Backend, ComponentEngine, check_build_options, cuda_available, tensorrt_importable
from dfosd.engines.tensorrt_common import (
    check_plan_system,
    import_tensorrt,
    plan_problems,
    read_plan_manifest,
    rebuild_command,
    system_info,
    trt_dtypes,
)

log = logging.getLogger(__name__)


class TrtComponent(ComponentEngine):
    def __init__(self, contract: ComponentContract, runtime, engine, context):
        super().__init__(contract, device="cuda")
        self.runtime, self.engine, self.context = runtime, engine, context  # runtime outlives the engine
        self.device_memory_bytes = int(engine.device_memory_size_v2)

    def bind(self, inputs, outputs) -> None:
        for specs, tensors, is_input in ((self.contract.inputs, inputs, True), (self.contract.outputs, outputs, False)):
            for spec in specs:
                if is_input and not self.context.set_input_shape(spec.name, spec.shape):
                    raise RuntimeError(f"{self.contract.stem}: TensorRT refused shape {spec.shape} for {spec.name}")
                if not self.context.set_tensor_address(spec.name, tensors[spec.name].data_ptr()):
                    raise RuntimeError(f"{self.contract.stem}: TensorRT refused the address of {spec.name}")

    def enqueue(self, inputs, outputs) -> None:
        import torch

        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.contract.stem}: TensorRT enqueue failed (see its log)")


def _check_engine_io(trt, engine, contract: ComponentContract, plan: Path) -> None:
    dtypes = trt_dtypes(trt)
    modes = {"input": trt.TensorIOMode.INPUT, "output": trt.TensorIOMode.OUTPUT}
    want = {s.name: ("input", s) for s in contract.inputs} | {s.name: ("output", s) for s in contract.outputs}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    problems = [] if sorted(names) == sorted(want) else [f"tensors {sorted(names)}, contract {sorted(want)}"]
    for name in names:
        if name not in want:
            continue
        mode, spec = want[name]
        if engine.get_tensor_mode(name) != modes[mode]:
            problems.append(f"{name} is not an {mode}")
        if engine.get_tensor_dtype(name) != dtypes[spec.dtype]:
            problems.append(f"{name}: type {engine.get_tensor_dtype(name)}, contract {spec.dtype}")
        if tuple(engine.get_tensor_shape(name)) != spec.shape:
            problems.append(f"{name}: shape {tuple(engine.get_tensor_shape(name))}, contract {spec.shape}")
    if problems:
        raise DfosdError(f"{plan} does not match its contract: " + "; ".join(problems),
                         hint=f"rebuild: {rebuild_command(plan.parent)} --force")


class TensorRTBackend(Backend):
    name = "tensorrt"
    capturable = True
    prepare_on_export = True
    install_hint = ("pip install --extra-index-url https://pypi.nvidia.com 'dfosd[tensorrt]' on a machine with an "
                    "NVIDIA GPU, or use --backend onnxruntime")

    def __init__(self, device: str = "cuda"):
        if device != "cuda":
            raise DfosdError(f"the TensorRT backend runs on CUDA, not {device!r}")
        super().__init__(device)
        self._trt = import_tensorrt()
        self._system = system_info(self._trt)
        self._logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._components: list[TrtComponent] = []
        self._activations = None  # torch uint8 CUDA tensor shared by every context

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not tensorrt_importable():
            return False, "the tensorrt package is not installed"
        if not cuda_available():
            return False, "no CUDA GPU is visible"
        try:
            trt = import_tensorrt()
            info = system_info(trt)
        except DfosdError as exc:
            return False, exc.message
        except Exception as exc:  # a broken TensorRT/CUDA install raises its own types
            return False, f"tensorrt does not load ({type(exc).__name__}: {exc})"
        return True, f"TensorRT {info['tensorrt']} on {info['gpu']} (SM {info['sm']}, CUDA {info['cuda']})"

    @classmethod
    def preferred_precision(cls) -> tuple[str, str]:
        return "fp16", "TensorRT runs on a CUDA GPU, where fp16 is the fast path"

    def prepare(self, export: ExportDir, *, progress=log.info, force: bool = False,
                workspace_gib: float | None = None, **options) -> None:
        """Build (or reuse) a plan per part (engines/tensorrt_build.py)."""
        from dfosd.engines.tensorrt_build import DEFAULT_WORKSPACE_BYTES, build_engines

        check_build_options(self.name, options, ())
        workspace = DEFAULT_WORKSPACE_BYTES if workspace_gib is None else int(workspace_gib * 2**30)
        build_engines(export.path, progress=progress, workspace_bytes=workspace, force=force)

    def load(self, export: ExportDir, part: PartRecord) -> TrtComponent:
        trt = self._trt
        export_dir = export.path
        contract = part.contract
        plan_manifest = read_plan_manifest(export_dir, contract.stem)
        check_plan_system(plan_manifest, self._system, export_dir)
        plan = export_dir / plan_manifest["plan"]
        problems = plan_problems(export, part.onnx, plan_manifest, quick=export.check != "full")
        if problems:
            raise problems_error(f"{plan} cannot run this export", problems,
                                 hint=f"rebuild: {rebuild_command(export_dir)}")
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise DfosdError(f"TensorRT could not deserialize {plan} (its log above says why)",
                             hint=f"rebuild: {rebuild_command(export_dir)} --force")
        _check_engine_io(trt, engine, contract, plan)
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise DfosdError(f"TensorRT could not create an execution context for {plan}")
        component = TrtComponent(contract, runtime, engine, context)
        self._components.append(component)
        self._share_activations()
        return component

    def _share_activations(self) -> None:
        """One activation buffer for all contexts, grown to the largest need (re-set on every context)."""
        import torch

        need = max(c.device_memory_bytes for c in self._components)
        if self._activations is None or self._activations.numel() < need:
            self._activations = torch.empty(max(need, 1), dtype=torch.uint8, device="cuda")
        ptr, size = self._activations.data_ptr(), self._activations.numel()
        for c in self._components:
            c.context.set_device_memory(ptr, size)

    @property
    def activation_bytes(self) -> int:
        return 0 if self._activations is None else int(self._activations.numel())

    def describe(self) -> str:
        s = self._system
        return f"tensorrt {s['tensorrt']} on {s['gpu']} (SM {s['sm']}), shared activations {self.activation_bytes} B"


BACKEND = TensorRTBackend
