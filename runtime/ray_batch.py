"""``dfosd-trt-run --ray``: the same batch run on a Ray cluster (``pip install 'dfosd[ray]'``).

* **Workers**: Ray actors, each holding one set of engines, loaded once in its constructor
  with the local run's own builder (``batch.local_upscaler``). An actor task is one image
  through the local run's ``process_image`` (decode, tiling, engines, colour fix, encode, atomic
  write), so every output is byte-identical to the local run's; only the image's path goes to
  the worker and only its small report record comes back (no pixels cross the object store).
  One GPU per actor for a GPU backend, ``--ray-cpus-per-actor`` CPU threads per actor otherwise.
* **Nothing lost, nothing twice**: an actor whose process dies is restarted by Ray
  (``max_restarts``) and its unfinished tasks are re-run there (``max_task_retries``), both
  bounded; an image whose retries run out fails alone, named in the report. Each output is
  written atomically, then recorded (runtime/resume.py): running the same command again skips
  the images whose output is complete and current and does the rest.
* **Bounded driver**: the listing streams (runtime/listing.py) and at most
  ``IN_FLIGHT_PER_ACTOR`` images per actor are submitted ahead; records go to the report's
  spool file (runtime/stream_report.py). Each actor task is sent to the actor with the fewest
  unfinished ones; which node runs an actor is Ray's choice (spread).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from dfosd.core.cli_support import progress_bars
from dfosd.core.errors import DfosdError

log = logging.getLogger(__name__)

MAX_RESTARTS = 3          # per actor: restarts after its process died
MAX_TASK_RETRIES = 2      # per image: re-runs after the actor running it died
IN_FLIGHT_PER_ACTOR = 2   # images submitted ahead per actor: one running, one queued behind it
LOCAL_OBJECT_STORE = 256 * 2**20  # a Ray started here: only paths and records cross it
# Waiting for the actors to load their engines: a full-size OpenVINO compile on a cold node takes
# minutes, so the bound is generous; it exists because a cluster that goes away (or never places the
# actors) would otherwise leave the driver waiting forever.
WORKER_START_TIMEOUT_S = 1200.0
INSTALL_HINT = "pip install 'dfosd[ray]'  (Ray 2.60 with Ray Data)"


def require_ray() -> None:
    """A clear message, before anything else happens, when Ray is not installed."""
    try:
        found = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked installation reads as none
        found = False
    if not found:
        raise DfosdError("--ray needs Ray, which is not installed in this Python", hint=INSTALL_HINT)


class UpscaleWorker:
    """One set of engines in one Ray actor (see the module docstring); ray.remote is applied at run time."""

    def __init__(self, export_dir: str, backend: str, batch: int | None, tile: int | None, overlap: int | None,
                 threads: int, opts: dict[str, Any], out_dir: str):
        if threads > 0:
            os.environ["DFOSD_THREADS"] = str(threads)  # engines/machine.py: intra-op threads of CPU backends
        from dfosd.runtime.batch import local_upscaler

        self.runner, self.tcfg, self.upscale = local_upscaler(export_dir, backend, batch, tile, overlap, log.info)
        self.opts, self.out = opts, Path(out_dir)
        plan = getattr(self.runner, "plan", None)  # the backend of each part, not its thread count
        self.identity = {"export": self.runner.export.build_key,
                         "backend": plan.to_dict().get("parts") if plan else self.runner.backend.describe(),
                         "precision": self.runner.precision, "tile": self.tcfg.tile, "overlap": self.tcfg.overlap,
                         "batch": self.tcfg.batch, "color_fix": opts["color_fix"], "format": opts["fmt"],
                         "quality": opts["quality"] if opts["fmt"] != "png" else None}

    def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()[:12],
                "backend": self.runner.backend.describe(), "precision": self.runner.precision,
                "plan": getattr(self.runner, "plan", None) and self.runner.plan.to_dict(),
                "tiling": {"tile": self.tcfg.tile, "overlap": self.tcfg.overlap, "batch": self.tcfg.batch}}

    def process(self, src: str, rel: str) -> dict[str, Any]:
        from dfosd.runtime.batch import process_image
        from dfosd.runtime.inputs import output_path_for
        from dfosd.runtime.resume import is_done, write_done

        dst = output_path_for(Path(rel), self.out, self.opts["fmt"])
        if is_done(self.out, Path(src), dst, self.identity):
            return {"input": src, "output": str(dst), "status": "skipped",
                    "reason": "done by an earlier run (input, export and options unchanged)"}
        rec = process_image(Path(src), Path(rel), self.upscale, self.tcfg.scale, self.opts, self.out)
        if rec["status"] == "ok":
            try:
                write_done(self.out, Path(src), dst, self.identity)
            except OSError as exc:  # the image is fine; a rerun will redo it
                rec.setdefault("notes", []).append(f"resume record not written: {exc}")
        rec["worker"] = f"{os.getpid()}"
        return rec


def connect(address: str | None, say: Callable[[str], None]):
    """ray.init for ``--ray [ADDRESS]``, with Ray's own meanings: no address joins the Ray running on this
    machine or starts one; ``local`` always starts a new one, private to this run; ``auto`` or HOST:PORT join."""
    import ray

    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    addr = address or None
    try:
        try:  # starting one here: a small object store (only paths and records cross it)
            starts = addr in (None, "local")
            ray.init(address=addr, **kwargs, **({"object_store_memory": LOCAL_OBJECT_STORE} if starts else {}))
        except ValueError as exc:  # ray.init found a running cluster to join: its store is its own
            if addr == "local" or "existing cluster" not in str(exc):
                raise
            ray.init(address=addr, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise DfosdError(f"cannot connect to the Ray cluster at {addr or 'this machine'}: {exc}",
                         hint="start it with `ray start --head`, or pass its address: --ray HOST:PORT") from None
    res = ray.cluster_resources()
    say(f"ray: {len([n for n in ray.nodes() if n.get('Alive')])} node(s), {res.get('CPU', 0):g} CPU, "
        f"{res.get('GPU', 0):g} GPU")
    return ray


def placement_problem(nodes: list[dict], cpus: int, gpu: bool) -> str | None:
    """Why no alive node could ever hold one worker (Ray would keep it pending forever), or None."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    if gpu and not any(r.get("GPU", 0) >= 1 for r in alive):
        return "the backend runs on a GPU and no node of the cluster has one"
    most = max((r.get("CPU", 0) for r in alive), default=0)
    if most < cpus:
        return f"each worker asks for {cpus} CPU(s) and the largest node has {most:g}"
    return None


def start_workers(ray, n: int | None, cpus: int, backend: str, kwargs: dict, say) -> tuple[list, list[dict]]:
    """Start the actors (one GPU each for a GPU backend) and wait until their engines are loaded."""
    from ray.exceptions import RayActorError

    res = ray.cluster_resources()
    # A GPU backend: TensorRT (for any part), or auto on a cluster with GPUs (auto picks TensorRT there).
    gpu = "tensorrt" in backend or (backend == "auto" and res.get("GPU", 0) > 0)
    if n is None:
        n = max(1, int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1)) // max(cpus, 1))
    worker_cls = ray.remote(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=MAX_RESTARTS,
                            max_task_retries=MAX_TASK_RETRIES, scheduling_strategy="SPREAD")(UpscaleWorker)
    say(f"ray: starting {n} worker(s), each {'1 GPU' if gpu else f'{cpus} CPU thread(s)'}, loading the engines once")
    problem = placement_problem(ray.nodes(), cpus, gpu)
    if problem:
        raise DfosdError(f"Ray cannot place a worker: {problem}",
                         hint="lower --ray-cpus-per-actor, or add such a node to the cluster")
    workers = [worker_cls.remote(backend=backend, threads=0 if gpu else cpus, **kwargs) for _ in range(n)]
    try:
        refs = [w.info.remote() for w in workers]
        pending, deadline = list(refs), time.monotonic() + WORKER_START_TIMEOUT_S
        while pending:  # in short waits: a stop signal's handler runs between them
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if pending and time.monotonic() > deadline:
                raise DfosdError(f"{len(pending)} of {n} Ray worker(s) not ready after "
                                 f"{WORKER_START_TIMEOUT_S:.0f} s (engines not loaded, or the actors never placed)",
                                 hint="check the cluster (`ray status`) and the Ray logs "
                                      "(/tmp/ray/session_latest/logs)")
        infos = ray.get(refs)
    except RayActorError as exc:
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, DfosdError):
            raise cause from None
        raise DfosdError(f"a Ray worker could not load the engines: {cause}",
                         hint="check that every node has dfosd installed and can read --engines and --out") from None
    return workers, infos


def run_on_ray(ray, workers: list, items: Iterable, rep, progress: bool) -> float:
    """Feed the streamed items to the workers and put every record into the report ``rep``;
    returns the seconds it took (the workers were ready before: engine loading is not in it)."""
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    alive = list(range(len(workers)))
    unfinished = dict.fromkeys(alive, 0)
    in_flight: dict[Any, tuple[str, int]] = {}
    bar = tqdm(desc="dfosd (ray)", unit="img", disable=not progress_bars(progress), file=sys.stderr)
    t0 = time.perf_counter()

    def collect_one() -> None:
        ready: list = []
        while not ready:  # in short waits: a stop signal's handler runs between them
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        ref = ready[0]
        src, i = in_flight.pop(ref)
        unfinished[i] -= 1
        try:
            rec = ray.get(ref)
        except RayActorError as exc:  # the actor died more often than Ray's bounded retries allow
            rec = {"input": src, "status": "failed", "error": f"{src}: the Ray worker running it died "
                   f"{MAX_TASK_RETRIES + 1} times ({type(exc).__name__}); run the same command again to retry it"}
            if i in alive:
                alive.remove(i)
        except RayTaskError as exc:  # a bug in the worker, not in the image: this image fails alone
            rec = {"input": src, "status": "failed", "error": f"{src}: {exc.cause if exc.cause else exc}"}
        if rec["status"] == "failed":
            tqdm.write(f"error: {rec['error']}", file=sys.stderr)
        rep.add(rec)
        c = rep.counts()
        bar.update(1)
        bar.set_postfix(ok=c["ok"], skipped=c["skipped"], failed=c["failed"],
                        rate=f"{c['ok'] / max(time.perf_counter() - t0, 1e-9):.2f}/s", refresh=False)

    try:
        for item in items:
            if item.kind != "image":
                rep.add(item.record())
                if item.kind == "problem":
                    tqdm.write(f"error: {item.message}", file=sys.stderr)
                continue
            while len(in_flight) >= IN_FLIGHT_PER_ACTOR * max(len(alive), 1):
                collect_one()
            if not alive:
                raise DfosdError("every Ray worker died more often than Ray's retries allow",
                                 hint="see the Ray logs (/tmp/ray/session_latest/logs); the same command resumes")
            i = min(alive, key=unfinished.__getitem__)
            in_flight[workers[i].process.remote(item.src, item.rel)] = (item.src, i)
            unfinished[i] += 1
        while in_flight:
            collect_one()
        return time.perf_counter() - t0
    except BaseException:  # Ctrl-C, SIGTERM, no worker left: what was in flight is named in the report
        for src, _ in in_flight.values():
            rep.add({"input": src, "status": "interrupted",
                     "error": "stopped while being upscaled (the same command finishes it)"})
        raise
    finally:
        bar.close()
