"""``dfosd-serve`` (serve the runtime through Triton) and ``dfosd triton-repo`` (write a repository)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.engines.base import BACKEND_CHOICES
from dfosd.serving.scheduler import DEFAULT_TIMEOUT_S

KINDS_HELP = "Comma-separated: python (dfosd runtime, any size), onnx (ONNX Runtime parts + ensemble), " \
             "tensorrt (plans + ensemble; default: where the export has plans)."


class _Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler to leave the serving loop."""


def _ignore_signals(handlers: dict) -> None:
    for s in handlers:
        signal.signal(s, signal.SIG_IGN)


@click.command(name="serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", "export_dir", required=True, type=click.Path(file_okay=False),
              help="Directory written by dfosd-export.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address of the HTTP front (inference, health, page). Inference needs no key: 0.0.0.0 "
                   "exposes it on every interface. gRPC and metrics stay on 127.0.0.1.")
@click.option("--admin-key", envvar="DFOSD_ADMIN_KEY", default=None,
              help="Opens Triton's management endpoints (logging, repository, trace, shared memory) to requests "
                   "with header dfosd-admin-key: KEY (also from $DFOSD_ADMIN_KEY). Without it they are closed.")
@click.option("--ui/--no-ui", default=True, show_default=True, help="Serve the upscaling page at /.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Most requests the dynamic batcher hands to the model at once.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Seconds a request may wait in the queue before it is rejected (0: no limit).")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Seconds after which a request that is not done fails (with the reason).")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="How long the batcher waits for more requests to batch.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              show_default=True, help="Engine backend of the runtime inside the server.")
@click.option("--tile-batch", type=int, default=None, help="Tile batch of the engines (default: the largest exported).")
@click.option("--overlap", type=int, default=None, help="Default tile overlap in LR pixels (default: tile/4).")
@click.option("--max-pixels", type=click.IntRange(1), default=None,
              help="Largest image accepted, in LR pixels (H*W; default 1048576).")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (each has its own engines and memory).")
@click.option("--repo", type=click.Path(file_okay=False), default=None,
              help="Keep the generated model repository here (default: a temporary folder).")
@click.option("--startup-timeout", type=click.FloatRange(1), default=300.0, show_default=True)
@click.option("--exit-timeout", type=click.IntRange(0, 3600), default=15, show_default=True,
              help="Seconds in-flight requests get to finish when the server stops or restarts.")
@click.option("--max-restarts", type=click.IntRange(0), default=3, show_default=True,
              help="Restarts of tritonserver after it or a model's backend process died; then exit 1.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, help="Server log (default: this terminal).")
@click.option("-v", "--verbose", is_flag=True, help="Verbose server log.")
@user_errors
def main(export_dir, http_port, grpc_port, metrics_port, host, admin_key, ui, max_batch, timeout_s, request_timeout_s,
         max_queue_delay_us, backend,
         tile_batch, overlap, max_pixels, instances, repo, startup_timeout, exit_timeout, max_restarts, log_file,
         verbose):
    """Serve the exported engines through Triton Inference Server (HTTP + gRPC).

    Clients send one uint8 image per batch entry, [n,H,W,3] (or [n,3,H,W] with request
    parameter layout=CHW), of any size, to model "dfosd" input "lr_image", and get
    "sr_image" x4 back (parameter color_fix: none|adain|wavelet, default the family's).
    HTTP goes through dfosd-serve's front, which checks each request before Triton sees it;
    the page at / upscales a picked image. Health: /v2/health/ready; metrics (on
    127.0.0.1): :METRICS-PORT/metrics.
    Ctrl-C or SIGTERM stops the server (in-flight requests finish first). If tritonserver or
    a model's backend process dies, the server is restarted (readiness is down meanwhile), at
    most --max-restarts times; then dfosd-serve exits with code 1.
    """
    setup_logging(verbose)
    from dfosd.serving.gateway import front_for
    from dfosd.serving.serve import ServeOptions, TritonServer

    opts = ServeOptions(export_dir=Path(export_dir), http_port=http_port, grpc_port=grpc_port,
                        metrics_port=metrics_port, host=host, max_batch=max_batch, timeout_s=timeout_s,
                        request_timeout_s=request_timeout_s,
                        max_queue_delay_us=max_queue_delay_us, backend=backend, tile_batch=tile_batch,
                        overlap=overlap, max_pixels=max_pixels, instances=instances,
                        repo=Path(repo) if repo else None, startup_timeout_s=startup_timeout,
                        exit_timeout_s=exit_timeout,
                        log_verbose=1 if verbose else 0, log_file=Path(log_file) if log_file else None,
                        admin_key=admin_key or None, ui=ui)
    server = TritonServer(opts)
    front = front_for(opts, server)

    def stop_handler(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop_handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if host not in ("127.0.0.1", "localhost", "::1"):
            say(f"dfosd-serve: listening on {host}: anyone who can reach this address can upscale images "
                f"(management endpoints {'need --admin-key' if admin_key else 'closed'})")
        front.start()
        server.start()
        say(f"dfosd-serve: starting tritonserver (pid {server.proc.pid}) on {export_dir} ...")
        server.wait_ready()
        say(f"dfosd-serve: ready  HTTP {_front_url(opts)}{'  page ' + _front_url(opts) + '/' if ui else ''}  "
            f"gRPC {server.grpc_url}  metrics {server.metrics_url}  model '{opts.model_name}' (Ctrl-C to stop)")
        _watch(server, max_restarts)
    except _Stop as why:
        _ignore_signals(previous)
        say(f"dfosd-serve: {why}: stopping tritonserver ...")
        code = server.stop()
        say(f"dfosd-serve: stopped (tritonserver exit code {code})")
    finally:
        _ignore_signals(previous)  # a second Ctrl-C must not interrupt the clean-up
        server.stop()
        front.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _front_url(opts) -> str:
    host = "127.0.0.1" if opts.host in ("0.0.0.0", "") else opts.host
    return f"http://{host}:{opts.http_port}"


def _watch(server, max_restarts: int) -> None:
    """Until a signal: restart the server when it cannot serve, at most ``max_restarts`` times.

    Stopping it first takes readiness down at once (its HTTP endpoint closes), so load
    balancers stop sending requests during the restart."""
    restarts = 0
    while True:
        problem = server.problem()
        if problem is None:
            time.sleep(0.5)
            continue
        say(f"dfosd-serve: {problem}; stopping tritonserver ...")
        server.stop()
        if restarts >= max_restarts:
            raise click.ClickException(f"{problem}; not restarted (--max-restarts {max_restarts} used up)")
        restarts += 1
        say(f"dfosd-serve: restarting tritonserver (restart {restarts} of at most {max_restarts}) ...")
        server.start()
        server.wait_ready()
        say("dfosd-serve: ready again")


@click.command(name="triton-repo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engines", "export_dir", required=True, type=click.Path(file_okay=False),
              help="Directory written by dfosd-export (and optionally TensorRT plans).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model repository to write.")
@click.option("--kinds", default=None, help=KINDS_HELP)
@click.option("--name", default="dfosd", show_default=True, help="Model name prefix.")
@click.option("--device", type=click.Choice(("cpu", "gpu")), default="gpu", show_default=True,
              help="Instance kind of the ONNX models (TensorRT plans always run on the GPU).")
@click.option("--python-device", type=click.Choice(("cpu", "gpu")), default="cpu", show_default=True,
              help="Instance kind of the Python model (gpu: one instance per GPU).")
@click.option("--link", type=click.Choice(("copy", "hardlink", "symlink")), default="copy", show_default=True,
              help="How model files get into the repository.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              show_default=True, help="Backend of the Python model's runtime.")
@click.option("--tile-batch", type=int, default=None)
@click.option("--overlap", type=int, default=None)
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True)
@click.option("--max-pixels", type=click.IntRange(1), default=None)
@click.option("--timeout", "timeout_s", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Python model: queue timeout per request in seconds (0: none).")
@click.option("--request-timeout", "request_timeout_s", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Python model: seconds after which a request that is not done fails.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Instances of each model (Triton's instance_group count; for GPU models, on each GPU).")
@click.option("--gpus", default=None, metavar="LIST",
              help="GPU models' instances go on these devices only, e.g. 0,1 (default: every visible GPU).")
@click.option("--force", is_flag=True, help="Write into a non-empty folder not made by this command.")
@user_errors
def triton_repo_main(export_dir, out_dir, kinds, name, device, python_device, link, backend, tile_batch, overlap,
                     max_batch, max_pixels, timeout_s, request_timeout_s, instances, gpus, force):
    """Write a Triton model repository (config.pbtxt + model files) from an export directory."""
    setup_logging(False)
    from dfosd.serving.triton_repo import DEFAULT_MAX_PIXELS, KINDS, RepoOptions, write_repository

    chosen = KINDS if kinds is None else tuple(k.strip() for k in kinds.split(",") if k.strip())
    opts = RepoOptions(name=name, kinds=chosen, device=device, python_device=python_device, link=link,
                       backend=backend, tile_batch=tile_batch, overlap=overlap, max_batch=max_batch,
                       max_pixels=max_pixels or DEFAULT_MAX_PIXELS, queue_timeout_s=timeout_s,
                       request_timeout_s=request_timeout_s, instances=instances, gpus=_gpu_list(gpus),
                       tensorrt_required=kinds is not None and "tensorrt" in chosen)
    result = write_repository(export_dir, out_dir, opts, force=force)
    for model, what in result.models.items():
        say(f"  {model}: {what}")
    for note in result.notes:
        say(f"note: {note}")
    say(f"wrote {len(result.models)} models to {result.repo}")


def _gpu_list(text: str | None) -> tuple[int, ...]:
    """``--gpus 0,1`` -> (0, 1); anything but device numbers is a user error naming the flag."""
    from dfosd.core.errors import DfosdError

    if text is None:
        return ()
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isdigit() for t in items):
        raise DfosdError(f"--gpus {text!r}: expected device numbers separated by commas", hint="e.g. --gpus 0,1")
    return tuple(int(t) for t in items)


if __name__ == "__main__":  # pragma: no cover
    main()
