"""AOTInductor backend: the ``.pt2`` packages built by ``engines.aoti_build``, run on the runner's buffers.

Each part is one package loaded with ``torch._inductor.aoti_load_package``. A package
allocates its own outputs (from torch's caching allocator), so ``run`` copies them into
the runner's static output buffers; the copies are small (a latent, one uint8 image).

On CUDA a run only enqueues kernels on torch's current stream, so ``capturable`` is
True and ``runtime/step.py`` captures the three parts and their copies in one CUDA
graph. The packages are loaded with ``run_single_threaded=True``: the default runner
keeps a pool of model instances and, from the second call on, asks CUDA whether the
previous call finished (``cudaEventQuery``/``cudaEventSynchronize``), which is not
permitted while a stream is being captured. The single-threaded runner skips that
bookkeeping; the price is that one loaded part must not be run from two threads at once
(the runner never does). Output memory made during capture comes from the graph's
private pool, so replays reuse the same addresses.

Before a package is loaded its manifest section is checked against the running system
(torch version, device, GPU SM / CPU ISA) and the export (same build key), and the
package against its recorded size/hash: a foreign or stale package is refused with the
command that rebuilds it.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.core.manifest import ExportDir, PartRecord, changed_files
from dfosd.engines.base import Backend, ComponentEngine, check_build_options, cuda_available

AOTI_BUILD_OPTIONS = ("precision", "channels_last", "max_autotune", "ckpt", "base")

log = logging.getLogger(__name__)


class AotiComponent(ComponentEngine):
    def __init__(self, contract: ComponentContract, model, device: str, package: Path):
        super().__init__(contract, device=device)
        self.model = model
        self.package = package

    def enqueue(self, inputs, outputs) -> None:
        result = self.model(*(inputs[s.name] for s in self.contract.inputs))
        results = result if isinstance(result, (list, tuple)) else (result,)
        if len(results) != len(self.contract.outputs):
            raise RuntimeError(f"{self.package} returned {len(results)} outputs, its contract has "
                               f"{len(self.contract.outputs)}")
        for spec, value in zip(self.contract.outputs, results):
            outputs[spec.name].copy_(value)


def _load_package(path: Path, device: str):
    import torch

    load = torch._inductor.aoti_load_package
    params = inspect.signature(load).parameters
    kwargs = {}
    if "run_single_threaded" in params:
        kwargs["run_single_threaded"] = True
    if device == "cuda" and "device_index" in params:
        kwargs["device_index"] = torch.cuda.current_device()
    return load(str(path), **kwargs)


class AotiBackend(Backend):
    name = "aoti"
    reads_onnx = False  # it runs its own packages, recorded in manifest.aoti.json

    def __init__(self, device: str | None = None):
        if device is None:
            device = "cuda" if cuda_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise DfosdError(f"the aoti backend runs on cpu or cuda, not {device!r}")
        super().__init__(device)
        # An instance attribute: capture only makes sense for CUDA packages.
        self.capturable = device == "cuda"
        self._system: dict | None = None

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import torch
            import torch._inductor
        except ImportError as exc:
            return False, f"torch's AOTInductor does not import ({exc})"
        if not hasattr(torch._inductor, "aoti_load_package"):
            return False, f"torch {torch.__version__} has no torch._inductor.aoti_load_package (needs torch >= 2.6)"
        if cuda_available():
            try:
                name = torch.cuda.get_device_name(torch.cuda.current_device())
                major, minor = torch.cuda.get_device_capability()
            except Exception as exc:  # a broken driver raises its own types
                return False, f"torch sees a GPU but cannot query it ({type(exc).__name__}: {exc})"
            return True, (f"AOTInductor packages (torch {torch.__version__}) on {name} (SM {major}.{minor}); "
                          "needs packages built by dfosd aoti-export --device cuda")
        return True, (f"AOTInductor packages (torch {torch.__version__}) on the CPU; "
                      "needs packages built by dfosd aoti-export --device cpu")

    def prepare(self, export: ExportDir, *, progress=log.info, force: bool = False, **options) -> None:
        """Compile every part into a package for this device (engines/aoti_build.py); ``options``:
        precision, channels_last, max_autotune, ckpt, base (as ``export_aoti`` takes them)."""
        from dfosd.engines.aoti_build import export_aoti

        check_build_options(self.name, options, AOTI_BUILD_OPTIONS)
        given = {k: v for k, v in options.items() if v is not None}
        result = export_aoti(export.path, device=self.device, force=force, progress=progress,
                             **{k: bool(v) if k == "max_autotune" else v for k, v in given.items()})
        b = result.build
        progress(f"{'reused' if result.reused else 'wrote'} {len(b['components'])} AOTInductor packages "
                 f"({b['precision']}, {self.device}{', channels_last' if b['channels_last'] else ''}, batches "
                 f"{b['batches']}) in {result.export_dir} [{result.seconds:.1f} s]; run them with --backend aoti")

    def load(self, export: ExportDir, part: PartRecord) -> AotiComponent:
        from dfosd.engines.aoti_build import check_build, rebuild_command, system_info

        export_dir, contract = export.path, part.contract
        if self._system is None:
            self._system = system_info(self.device)
        build = check_build(export_dir, self.device, export=export, running=self._system)
        rec = build.get("components", {}).get(contract.stem)
        fix = f"rebuild: {rebuild_command(export_dir, self.device)}"
        if rec is None:
            raise DfosdError(f"{export_dir} has no {self.device} AOTInductor package for {contract.stem} "
                             f"(it has {', '.join(sorted(build.get('components', {}))) or 'none'})", hint=fix)
        if ComponentContract.from_dict(rec["contract"]) != contract:
            raise DfosdError(f"{rec['package']} was compiled for another contract than {contract.stem}'s", hint=fix)
        package = export_dir / rec["package"]
        if changed_files(export_dir, {rec["package"]: build["files"].get(rec["package"], {})},
                         quick=export.check != "full"):
            # dfosd build rebuilds it without --force: its reuse check hashes every package
            raise DfosdError(f"{package} is missing or changed (truncated, edited) since it was built", hint=fix)
        try:
            model = _load_package(package, self.device)
        except Exception as exc:  # the loader raises RuntimeError with the C++ message
            raise DfosdError(f"AOTInductor could not load {package}: {exc}", hint=fix) from exc
        return AotiComponent(contract, model, self.device, package)

    def describe(self) -> str:
        return f"aoti (AOTInductor packages on {'CUDA' if self.device == 'cuda' else 'the CPU'})"


BACKEND = AotiBackend
