"""OpenVINO backend (CPU): the exported ONNX files as they are, compiled once and cached.

- Reads ``<part>_b<batch>.onnx`` directly (OpenVINO's ONNX frontend): fp32 and fp16 exports,
  and the 8-bit Q/DQ exports, int8 and fp8 (E4M3) alike. Measured on the tiny model
  (tests/engines/test_openvino.py): the same parity against eager fp32 as ONNX Runtime
  within 1 dB (int8 31.7 vs 31.9 dB, fp8 25.4 vs 25.6 dB), not the same pixels: the two
  runtimes round the quantized arithmetic differently.
- Compiled once per part into ``<export>/openvino-cache/<part>_b<batch>.blob`` (written by
  dfosd from ``export_model``, imported memory-mapped with ``import_model``; not OpenVINO's
  CACHE_DIR, whose entries are keyed by the ONNX file's absolute path, so a moved export
  compiled a new set and kept the old one). Each blob is recorded with its hash in the
  export's runtime records (engines/cache.py) beside the OpenVINO version, the CPU model, its
  ISA, the compile options and the export's build key, and checked at load: a damaged blob
  is rebuilt, a cache of another identity emptied of its recorded blobs and rebuilt. The
  first compile holds the blob once more in memory while writing it (export_model's bytes).
- Compile options are explicit, not OpenVINO's defaults: the LATENCY hint (one stream,
  one request at a time, as the runner calls), ``INFERENCE_NUM_THREADS`` = physical
  cores, and ``INFERENCE_PRECISION_HINT`` = f32. The hint matters: on CPUs with AMX or
  AVX512-BF16 OpenVINO would otherwise run fp32 graphs in bf16 (faster, but no longer the
  exported model's numbers).
- ``openvino-bf16`` is that bf16 compute asked for by name: the same ONNX files, OpenVINO
  told to compute in bf16 (INFERENCE_PRECISION_HINT=bf16). Only offered where the CPU has
  native bf16 (OpenVINO lists BF16 among the CPU's OPTIMIZATION_CAPABILITIES: AVX512-BF16
  or AMX); elsewhere OpenVINO would emulate it. Measured at full size on a 2-core Xeon with
  AMX (BENCHMARKS.md): 6.3x eager PyTorch fp32 and 4.4x OpenVINO f32 over the step, 40.1 dB
  from eager fp32 (eager bf16 autocast: 40.0 dB). Never picked by ``auto``, which keeps the
  export's numbers. Its blobs live in their own cache folder, so the two variants do not
  evict each other.
- Buffers: the runner's torch tensors are wrapped as OpenVINO tensors that share their
  memory, set once on the infer request, so a call reads and writes them in place.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from dfosd.core.contracts import ComponentContract
from dfosd.core.errors import DfosdError
from dfosd.engines.base import Backend, ComponentEngine, check_build_options
from dfosd.core.atomic import write_bytes_atomic
from dfosd.core.manifest import ExportDir, PartRecord
from dfosd.engines.cache import CacheFolders
from dfosd.engines.machine import cpu_threads, machine_identity

log = logging.getLogger(__name__)

CACHE_DIR = "openvino-cache"
CACHE_RECORD = "openvino_cache"
BF16_CACHE_DIR = "openvino-bf16-cache"
BF16_CACHE_RECORD = "openvino_bf16_cache"
INSTALL_HINT = "pip install 'dfosd[openvino]' (or: pip install openvino), or use --backend onnxruntime"
PRECISION_HINTS = ("f32", "bf16", "f16")


def blob_name(stem: str) -> str:
    return f"{stem}.blob"


def _openvino():
    try:
        import openvino
    except ImportError as exc:
        raise DfosdError(f"backend openvino is not usable here: the openvino package does not import ({exc})",
                         hint=INSTALL_HINT) from exc
    return openvino


class OpenVinoComponent(ComponentEngine):
    def __init__(self, compiled, contract: ComponentContract):
        super().__init__(contract, device="cpu")  # shared-memory tensors wrap CPU buffers only
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        got = {n for port in list(compiled.inputs) + list(compiled.outputs) for n in port.get_names()}
        missing = {s.name for s in contract.inputs + contract.outputs} - got
        if missing:
            raise DfosdError(f"{contract.stem}: the compiled model has no tensors {sorted(missing)} of its contract",
                             hint="re-run dfosd-export into a clean directory")

    def bind(self, inputs, outputs) -> None:
        import openvino as ov

        for specs, tensors in ((self.contract.inputs, inputs), (self.contract.outputs, outputs)):
            for spec in specs:
                # shared_memory: OpenVINO reads/writes the torch buffer itself, no copy per call
                self.request.set_tensor(spec.name, ov.Tensor(tensors[spec.name].numpy(), shared_memory=True))

    def enqueue(self, inputs, outputs) -> None:
        self.request.infer()


class OpenVinoBackend(Backend):
    name = "openvino"
    prepare_on_export = True
    cpu_auto_candidate = True
    packages = ("openvino",)
    install_hint = INSTALL_HINT
    cache_dir = CACHE_DIR
    cache_record_key = CACHE_RECORD
    default_precision_hint = "f32"

    def __init__(self, device: str | None = None, *, threads: int = 0, precision_hint: str | None = None,
                 cache: bool = True):
        super().__init__("cpu" if device is None else device)
        if self.device != "cpu":
            raise DfosdError(f"the openvino backend runs on the CPU here, not {self.device}",
                             hint="use --backend onnxruntime or tensorrt for a GPU")
        precision_hint = precision_hint or self.default_precision_hint
        if precision_hint not in PRECISION_HINTS:
            raise DfosdError(f"openvino precision hint {precision_hint!r}: choose one of {', '.join(PRECISION_HINTS)}")
        self.threads = threads or cpu_threads()
        self.precision_hint = precision_hint
        self.cache = cache
        self._core = None
        self._caches = CacheFolders(self.cache_dir, self.cache_record_key, log)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            ov = _openvino()
        except DfosdError as exc:
            return False, exc.message.removeprefix("backend openvino is not usable here: ")
        return True, f"OpenVINO {ov.get_version().split('-')[0]} on the CPU"

    @property
    def core(self):
        if self._core is None:
            self._core = _openvino().Core()
        return self._core

    def compile_config(self) -> dict[str, str]:
        return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(self.threads),
                "INFERENCE_PRECISION_HINT": self.precision_hint, "NUM_STREAMS": "1"}

    def cache_identity(self, export: ExportDir) -> dict:
        return {"openvino": _openvino().get_version(), "machine": machine_identity(),
                "config": self.compile_config(), "build_key": export.build_key}

    def load(self, export: ExportDir, part: PartRecord) -> OpenVinoComponent:
        path = export.file(part.onnx)
        config = self.compile_config()
        cache = self._caches.get(export, self.cache_identity) if self.cache else None
        if cache is not None and cache.lookup(part.stem) is not None:
            blob = cache.path(blob_name(part.stem))
            try:
                compiled, mapped = self._import(blob, config)
                component = OpenVinoComponent(compiled, part.contract)
                component.mapped_blob = mapped
                return component
            except Exception as exc:  # recorded and intact, yet refused: rebuilt like a damaged one
                log.warning("%s: openvino could not import it (%s): rebuilding it", blob,
                            str(exc).strip().splitlines()[0])
                cache.forget(part.stem)
        try:
            compiled = self.core.compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for bad files and ops
            raise DfosdError(f"openvino could not compile {path}: {str(exc).strip().splitlines()[0]}",
                             hint="re-run dfosd-export to rewrite the directory, or use --backend onnxruntime") from exc
        if cache is not None and cache.usable:
            # The blob is written by dfosd under the part's name (not OpenVINO's CACHE_DIR, whose
            # entries are keyed by the ONNX file's absolute path): it moves with the export.
            try:
                write_bytes_atomic(cache.path(blob_name(part.stem)), compiled.export_model().getbuffer())
            except OSError as exc:  # a read-only export or a full disk: run compiled, cache nothing
                log.warning("%s: not saving the compiled blob (%s)", cache.folder, exc)
            else:
                cache.commit(part.stem, [blob_name(part.stem)])
        return OpenVinoComponent(compiled, part.contract)

    def _import(self, blob: Path, config: dict):
        """(the compiled model, the mapping it may read from: kept alive with it)."""
        import numpy as np

        ov = _openvino()
        # Mapped, not read: importing the full-size UNet's blob must not hold a second copy in memory
        # (copy-on-write because OpenVINO's Tensor wants a writable array; nothing writes to it).
        # OpenVINO may keep reading weights from the mapping, so the engine holds it.
        mapped = np.memmap(blob, dtype=np.uint8, mode="c")
        return self.core.import_model(ov.Tensor(mapped, shared_memory=True), "CPU", config), mapped

    def prepare(self, export: ExportDir, *, progress=log.info, force: bool = False, **options) -> None:
        """Compile every part of the export into its cache now (``dfosd build --backend openvino``),
        so the first run imports blobs instead of compiling."""
        import time

        check_build_options(self.name, options, ())
        for part in export.all_parts():
            if force and self.cache:
                self._caches.get(export, self.cache_identity).forget(part.stem)
            t0 = time.perf_counter()
            self.load(export, part)
            progress(f"{self.name}: {part.onnx} ready in {export.file(self.cache_dir)} "
                     f"[{time.perf_counter() - t0:.1f} s]")

    def describe(self) -> str:
        return f"{self.name} (CPU, {self.threads} threads, {self.precision_hint})"


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (its own capability list). Asked
    once per process: it loads the CPU plugin, and every openvino-bf16 availability check and
    every auto run on a CPU ask it."""
    try:
        caps = _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except DfosdError as exc:
        return False, exc.message.removeprefix("backend openvino is not usable here: ")
    except Exception as exc:  # an OpenVINO without a CPU plugin
        return False, f"OpenVINO's CPU plugin did not answer ({str(exc).strip().splitlines()[0]})"
    if "BF16" not in caps:
        return False, ("this CPU has no native bf16 (neither AVX512-BF16 nor AMX; OpenVINO lists "
                       f"{', '.join(caps)}): bf16 would be emulated, slower than f32")
    return True, "native bf16 on this CPU"


class OpenVinoBf16Backend(OpenVinoBackend):
    """OpenVINO computing the export's graph in bf16: faster where the CPU has AMX or
    AVX512-BF16, and approximate (40.1 dB from eager fp32 at full size, measured)."""
    name = "openvino-bf16"
    install_hint = ("use --backend openvino (the export's own numbers) on a CPU without native bf16; "
                    "or pip install 'dfosd[openvino]'")
    cache_dir = BF16_CACHE_DIR
    cache_record_key = BF16_CACHE_RECORD
    default_precision_hint = "bf16"
    cpu_auto_candidate = False
    approximate = "OpenVINO computing in bf16, native on this CPU"

    @classmethod
    def preferred_precision(cls) -> tuple[str, str]:
        return "fp32", "openvino-bf16 computes the fp32 graph in bf16 (bf16 keeps fp32's range; fp16 files would not)"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        ok, why = super().availability()
        if not ok:
            return ok, why
        native, reason = cpu_has_native_bf16()
        return native, (f"{why}, computing in bf16 ({reason})" if native else reason)


BACKEND = OpenVinoBackend
BF16_BACKEND = OpenVinoBf16Backend
