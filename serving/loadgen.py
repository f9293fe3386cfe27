"""A bounded load generator for a served dfosd model: latency and throughput under concurrency.

    python -m dfosd.serving.loadgen --engines DIR [--concurrency 1,2,4,8] [--seconds 10] [--sizes 64x64]
    python -m dfosd.serving.loadgen --url grpc://host:8001 ...

With ``--engines`` it starts its own dfosd-serve (tritonserver on free loopback ports) and
stops it afterwards; with ``--url`` it measures a running server. For each image size and
concurrency level, N client threads (one connection each) send the same uint8 HWC image
back to back for ``--seconds`` after a warm-up; every request is timed end to end on the
client. Reported: completed and failed requests, throughput (requests/s and LR
megapixels/s), latency median / p90 / p99, and from Triton's own statistics the mean
batch size per model execution and the mean queue and compute times.

(PyPI's ``perf_analyzer`` 0.1.0 is a placeholder without the binary, hence this module.)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from dfosd.core.cli_support import parse_int_list, say, user_errors
from dfosd.core.errors import DfosdError


@dataclass
class LevelResult:
    size: str
    concurrency: int
    seconds: float
    completed: int
    failed: int
    requests_per_s: float
    lr_megapixels_per_s: float
    latency_ms_median: float
    latency_ms_p90: float
    latency_ms_p99: float
    mean_batch_size: float | None = None
    mean_queue_ms: float | None = None
    mean_compute_ms: float | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    import math

    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


def cpu_description() -> str:
    from dfosd.engines.machine import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, {platform.system()})"


def _stats(url: str, model: str) -> dict:
    """Triton's cumulative statistics of the model (counts and nanoseconds)."""
    import tritonclient.http as th

    from dfosd.serving.client import parse_server_url

    protocol, address = parse_server_url(url)
    if protocol != "http":  # statistics through the HTTP endpoint of the same server is simplest
        return {}
    client = th.InferenceServerClient(address)
    try:
        s = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    inf = s["inference_stats"]
    return {"executions": int(s.get("execution_count", 0)), "inferences": int(s.get("inference_count", 0)),
            "queue_ns": int(inf["queue"]["ns"]), "compute_ns": int(inf["compute_infer"]["ns"]),
            "success": int(inf["success"]["count"])}


def run_level(url: str, model: str, array, concurrency: int, seconds: float, warmup: float) -> tuple[list, int, float]:
    """(latencies in s, failures, measured wall time) of ``concurrency`` clients for ``seconds``."""
    from dfosd.serving.client import UpscaleClient

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + warmup
    stop = start + seconds

    def worker():
        # tritonclient's HTTP client runs on gevent, whose connections belong to the thread that
        # made them: each worker makes its own client (= its own connection).
        client = UpscaleClient(url, model=model)
        try:
            while True:
                t0 = time.monotonic()
                if t0 >= stop:
                    return
                error = None
                try:
                    client.infer_array(array, layout="HWC")
                except Exception as exc:  # any failure counts; the first few are reported
                    error = f"{type(exc).__name__}: {exc}"
                t1 = time.monotonic()
                if t0 >= start:  # only requests sent after the warm-up count
                    with lock:
                        if error is None:
                            latencies.append(t1 - t0)
                        else:
                            failures.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start  # includes the tail of requests sent before stop
    for f in failures[:3]:
        say(f"  failed: {f}")
    return latencies, len(failures), wall


def measure(url: str, *, model: str = "dfosd", sizes: list[tuple[int, int]], concurrency: list[int],
            seconds: float, warmup: float, stats_url: str | None = None) -> list[LevelResult]:
    """``stats_url``: the server's HTTP address for Triton's statistics (default ``url`` if it is HTTP)."""
    stats_url = stats_url or url
    import numpy as np

    rng = np.random.default_rng(0)
    results = []
    for h, w in sizes:
        array = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        for n in concurrency:
            before = _stats(stats_url, model)
            lat, failed, wall = run_level(url, model, array, n, seconds, warmup)
            after = _stats(stats_url, model)
            if not lat:
                raise DfosdError(f"no request completed at concurrency {n} ({failed} failed)")
            r = LevelResult(size=f"{w}x{h}", concurrency=n, seconds=round(wall, 2), completed=len(lat),
                            failed=failed, requests_per_s=round(len(lat) / wall, 3),
                            lr_megapixels_per_s=round(len(lat) * h * w / wall / 1e6, 4),
                            latency_ms_median=round(statistics.median(lat) * 1e3, 1),
                            latency_ms_p90=round(percentile(lat, 90) * 1e3, 1),
                            latency_ms_p99=round(percentile(lat, 99) * 1e3, 1))
            if before and after and after["executions"] > before["executions"]:
                execs = after["executions"] - before["executions"]
                done = after["success"] - before["success"]
                r.mean_batch_size = round((after["inferences"] - before["inferences"]) / execs, 2)
                r.mean_queue_ms = round((after["queue_ns"] - before["queue_ns"]) / max(done, 1) / 1e6, 1)
                r.mean_compute_ms = round((after["compute_ns"] - before["compute_ns"]) / max(done, 1) / 1e6, 1)
            say(f"  {r.size} x{n}: {r.requests_per_s} req/s, median {r.latency_ms_median} ms, p90 "
                f"{r.latency_ms_p90} ms, {r.failed} failed, mean batch {r.mean_batch_size}")
            results.append(r)
    return results


def markdown(results: list[LevelResult], meta: dict) -> str:
    lines = [
        "# dfosd serving: latency and throughput (Triton, Python-backend model)",
        "",
        f"- Machine: {meta['machine']}",
        f"- Server: {meta['server']}",
        f"- Model: {meta['model']}",
        f"- Method: {meta['method']}",
    ]
    lines += [f"- Note: {n}" for n in meta.get("notes", [])]
    lines += ["", "| LR size | concurrency | req/s | LR MP/s | median ms | p90 ms | p99 ms | completed | failed "
              "| mean batch | queue ms | compute ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.size} | {r.concurrency} | {r.requests_per_s} | {r.lr_megapixels_per_s} | "
                     f"{r.latency_ms_median} | {r.latency_ms_p90} | {r.latency_ms_p99} | {r.completed} | {r.failed} "
                     f"| {r.mean_batch_size} | {r.mean_queue_ms} | {r.mean_compute_ms} |")
    return "\n".join(lines) + "\n"


def _sizes(value: str) -> list[tuple[int, int]]:
    out = []
    for item in value.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{item!r}: use WxH, e.g. 64x64", param_hint="--sizes") from None
        out.append((h, w))
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", "export_dir", type=click.Path(file_okay=False), default=None,
              help="Start a server on this export (else --url).")
@click.option("--url", default=None, help="A running server: http://HOST:PORT or grpc://HOST:PORT.")
@click.option("--protocol", type=click.Choice(("http", "grpc")), default="http", show_default=True,
              help="With --engines: which endpoint the clients use.")
@click.option("--model", default="dfosd", show_default=True)
@click.option("--concurrency", default="1,2,4,8", show_default=True)
@click.option("--sizes", default="64x64", show_default=True, help="LR image sizes WxH, comma-separated.")
@click.option("--seconds", type=click.FloatRange(0.5), default=10.0, show_default=True, help="Per level.")
@click.option("--warmup", type=click.FloatRange(0), default=2.0, show_default=True, help="Per level.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="With --engines: the batcher's limit.")
@click.option("--out", "out_stem", type=click.Path(dir_okay=False), default=None,
              help="Write OUT.json and OUT.md.")
@click.option("--note", "notes", multiple=True, help="A line for the report (e.g. other load on the machine).")
@user_errors
def main(export_dir, url, protocol, model, concurrency, sizes, seconds, warmup, max_batch, out_stem, notes):
    """Measure latency (median, p90, p99) and throughput of a served dfosd model under concurrency."""
    if (export_dir is None) == (url is None):
        raise DfosdError("give --engines DIR (start a server) or --url URL (a running one)")
    levels = list(parse_int_list(concurrency, "--concurrency"))
    server = None
    load_before = os.getloadavg()
    try:
        if export_dir is not None:
            from dfosd.serving.gateway import front_for
            from dfosd.serving.serve import ServeOptions, TritonServer, free_port

            log = Path(out_stem + ".server.log") if out_stem else None
            opts = ServeOptions(export_dir=Path(export_dir), host="127.0.0.1", http_port=free_port(),
                                grpc_port=free_port(), metrics_port=free_port(), max_batch=max_batch, log_file=log)
            server = TritonServer(opts)
            front = front_for(opts, server).start()  # HTTP as dfosd-serve's clients see it: through its front
            server.start()
            server.wait_ready()
            url = f"http://127.0.0.1:{opts.http_port}" if protocol == "http" else server.grpc_url
            say(f"server ready at {url}")
        from dfosd.serving.client import UpscaleClient

        probe = UpscaleClient(url, model=model)
        described = probe.describe()
        probe.close()
        results = measure(url, model=model, sizes=_sizes(sizes), concurrency=levels, seconds=seconds,
                          warmup=warmup, stats_url=server.http_url if server is not None else None)
    finally:
        if server is not None:
            server.stop()
            front.stop()
    meta = {
        "machine": cpu_description(),
        "server": f"{described}; tritonserver from nvidia-pytriton, dynamic batching up to {max_batch} requests",
        "model": f"export {Path(export_dir).resolve()}" if export_dir else url,
        "method": f"per level: {warmup:g} s warm-up, then {seconds:g} s of N client threads (one {protocol} "
                  "connection each) sending one image per request back to back; latency = client-side round trip",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "notes": list(notes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if out_stem:
        from dfosd.core.manifest import write_text_atomic

        data = {"meta": meta, "results": [asdict(r) for r in results]}
        write_text_atomic(Path(out_stem + ".json"), json.dumps(data, indent=2) + "\n")
        write_text_atomic(Path(out_stem + ".md"), markdown(results, meta))
        say(f"wrote {out_stem}.json and {out_stem}.md")
    else:
        click.echo(markdown(results, meta))


if __name__ == "__main__":  # pragma: no cover
    main()
