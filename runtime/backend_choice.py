"""Which backend runs which part: one for all, one per part by name, or measured (auto).

``--backend`` takes ``auto``, a backend name, or a per-part list such as
``encoder=openvino,unet=onnxruntime,decoder=openvino``.

``auto`` keeps TensorRT when it is usable (a GPU and the package), and ONNX Runtime on a
GPU. On a CPU machine with more than one CPU backend (ONNX Runtime, OpenVINO) it times
each backend on each part, on the part's own static buffers, and keeps the fastest per
part: neither runtime wins every part (measured: OpenVINO's encoder 1.45x ONNX Runtime's,
its UNet 0.90x). The timing is done once: the choice and the medians go into the export's
records (``runtime.json``, key ``backend_choice_b<batch>``) with the machine's identity and the
backends' versions and settings, and are measured again when any of those differ.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import COMPONENTS

TIMING_WARMUP = 1
TIMING_REPEATS = 3


@dataclass
class BackendPlan:
    """The backend of each part and why; ``median_ms`` when the choice was measured."""
    names: dict[str, str]
    reason: str
    median_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cached: bool = False

    @property
    def mixed(self) -> bool:
        return len(set(self.names.values())) > 1

    def summary(self) -> str:
        return ", ".join(f"{p}={self.names[p]}" for p in COMPONENTS)

    def timing_lines(self) -> list[str]:
        lines = []
        for part in COMPONENTS:
            ms = self.median_ms.get(part)
            if ms:
                cells = "  ".join(f"{b} {v:.1f} ms" for b, v in sorted(ms.items(), key=lambda kv: kv[1]))
                lines.append(f"  {part:<8} {cells}  -> {self.names[part]}")
        return lines

    def to_dict(self) -> dict:
        return {"parts": dict(self.names), "reason": self.reason, "median_ms": self.median_ms, "cached": self.cached}


class PartBackends:
    """Stands in for ``runner.backend`` when parts run on different backends."""

    name = "per-part"

    def __init__(self, backends: dict[str, object], plan: BackendPlan):
        self.parts = backends
        self.plan = plan
        devices = {b.device for b in backends.values()}
        if len(devices) != 1:
            raise DfosdError(f"--backend {plan.summary()}: the parts would run on different devices "
                             f"({', '.join(sorted(devices))})", hint="choose backends that share one device")
        self.device = devices.pop()
        self.capturable = all(b.capturable for b in backends.values())

    def describe(self) -> str:
        return "per-part: " + ", ".join(f"{p}={self.parts[p].describe()}" for p in COMPONENTS)


def parse_backend_spec(spec: str) -> str | dict[str, str]:
    """``auto`` / a backend name, or ``part=backend,...`` naming all three parts."""
    from dfosd.engines.base import BACKEND_CHOICES, BACKENDS

    spec = spec.strip()
    if "=" not in spec:
        if spec not in BACKEND_CHOICES:
            raise DfosdError(f"unknown backend {spec!r}",
                             hint=f"choose one of {', '.join(BACKEND_CHOICES)}, or part=backend,... "
                                  f"for each of {', '.join(COMPONENTS)}")
        return spec
    names: dict[str, str] = {}
    for item in spec.split(","):
        part, _, name = (s.strip() for s in item.partition("="))
        if part not in COMPONENTS or name not in BACKENDS or part in names:
            raise DfosdError(f"--backend {spec!r}: {item.strip()!r} is not part=backend with a new part among "
                             f"{', '.join(COMPONENTS)} and a backend among {', '.join(BACKENDS)}")
        names[part] = name
    if set(names) != set(COMPONENTS):
        raise DfosdError(f"--backend {spec!r} names {', '.join(names)}; a per-part list names every part",
                         hint="e.g. encoder=openvino,unet=onnxruntime,decoder=openvino")
    return names


def check_backend_spec(spec: str) -> None:
    """The cheap check of ``--backend`` before a run starts: known names, and each named backend
    usable here (TensorRT installed, ...); ``auto`` chooses later, among the usable ones."""
    from dfosd.engines.base import select_backend

    parsed = parse_backend_spec(spec)
    for name in sorted(set(parsed.values()) if isinstance(parsed, dict) else {parsed} - {"auto"}):
        select_backend(name)


def cpu_candidates() -> list[str]:
    """CPU backends usable here, in the order ties are broken."""
    from dfosd.engines.base import BACKENDS, backend_class

    # The backends that say they compute the export's own numbers on a CPU (Backend.cpu_auto_candidate);
    # auto times them only when ONNX Runtime picked the CPU (step.OneStepRunner._resolve).
    found = []
    for name in BACKENDS:
        try:
            cls = backend_class(name)
        except DfosdError:  # not part of this build
            continue
        if cls.cpu_auto_candidate and cls.availability()[0]:
            found.append(name)
    return found


def approximate_hint() -> str | None:
    """A line for auto's output on a CPU where a faster, approximate backend is usable."""
    from dfosd.engines.base import BACKENDS, backend_class

    for name in BACKENDS:
        try:
            cls = backend_class(name)
            ok = cls.approximate is not None and cls.availability()[0]
        except DfosdError:
            continue
        if ok:
            return f"  faster but approximate here: --backend {name} ({cls.approximate}); auto keeps the export's numbers"
    return None


def time_parts(loaders: dict[str, Callable[[str], object]], contracts: dict, part: str, *,
               warmup: int = TIMING_WARMUP,
               repeats: int = TIMING_REPEATS) -> tuple[dict[str, object], dict[str, float]]:
    """Load ``part`` with every backend in ``loaders``, time them interleaved on the same CPU
    buffers, and return the engines and their median ms."""
    import torch

    c = contracts[part]
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for s in c.inputs:  # real-looking values: an all-zero input could take a special path
        t = s.empty("cpu")
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        else:
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        inputs[s.name] = t
    outputs = {s.name: s.empty("cpu") for s in c.outputs}
    engines = {name: load(part) for name, load in loaders.items()}
    for _ in range(warmup):
        for e in engines.values():
            e.run(inputs, outputs)
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeats):
        for name, e in engines.items():  # interleaved: load drifts hit every backend alike
            t0 = time.perf_counter()
            e.run(inputs, outputs)
            runs[name].append((time.perf_counter() - t0) * 1000.0)
    return engines, {name: round(statistics.median(r), 3) for name, r in runs.items()}


def _usable_choice(record: object, backends: dict[str, object]) -> bool:
    """A cached choice names one of the candidate backends for every part."""
    parts = record.get("parts") if isinstance(record, dict) else None
    return isinstance(parts, dict) and set(parts) == set(COMPONENTS) and all(v in backends for v in parts.values())


def choice_record_key(batch: int) -> str:
    return f"backend_choice_b{batch}"


def choice_identity(backends: dict[str, object], export) -> dict:
    from dfosd.engines.machine import machine_identity
    from dfosd.core.manifest import package_versions

    return {"machine": machine_identity(), "build_key": export.build_key,
            "backends": {n: b.describe() for n, b in backends.items()},
            "versions": package_versions(*sorted({p for b in backends.values() for p in b.packages}))}


def measured_choice(export, batch: int, contracts: dict, backends: dict[str, object],
                    load: Callable[[object, str], object], *, say: Callable[[str], None],
                    remeasure: bool = False, warmup: int = TIMING_WARMUP,
                    repeats: int = TIMING_REPEATS) -> tuple[BackendPlan, dict[str, object]]:
    """auto on a CPU machine: the cached per-part choice when it was made here, else time
    each candidate per part. ``export``: the ``ExportDir``, whose runtime records keep the
    choice. Returns the plan and the engines already loaded (the winners of a measurement;
    empty when the cached choice is used)."""
    from dfosd.core.vocab import RUNTIME_RECORDS_NAME

    key = choice_record_key(batch)
    ident = choice_identity(backends, export)
    old = export.runtime_record(key)
    if old and not _usable_choice(old, backends):
        say(f"auto: the cached choice {key} in {export.path / RUNTIME_RECORDS_NAME} is not a per-part choice "
            f"among {', '.join(backends)} (edited?); timing again")
        old = None
    if not remeasure and old and old.get("identity") == ident:
        plan = BackendPlan(dict(old["parts"]), "auto: per-part choice measured earlier on this machine "
                           f"({old.get('measured', '?')}), cached in {RUNTIME_RECORDS_NAME}",
                           old.get("median_ms", {}) if isinstance(old.get("median_ms"), dict) else {}, True)
        return plan, {}
    say(f"auto: timing {', '.join(backends)} on each part once (cached in {export.path / RUNTIME_RECORDS_NAME})")
    names, medians, engines = {}, {}, {}
    for part in COMPONENTS:
        loaded, ms = time_parts({n: (lambda p, b=b: load(b, p)) for n, b in backends.items()}, contracts, part,
                                warmup=warmup, repeats=repeats)
        best = min(ms, key=lambda n: (ms[n], list(backends).index(n)))
        names[part], medians[part], engines[part] = best, ms, loaded[best]
        del loaded  # the slower engines go now: two full-size UNets at once cost GBs
        gc.collect()
    plan = BackendPlan(names, "auto: fastest backend per part, measured now", medians)
    export.write_runtime_record(key, {"identity": ident, "parts": names, "median_ms": medians,
                                      "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "warmup": warmup, "repeats": repeats})
    return plan, engines
