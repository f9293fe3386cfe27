"""Run dfosd's Python-backend model in a real ``tritonserver`` and stop it cleanly.

The server is the binary PyPI's ``nvidia-pytriton`` ships (``pytriton/tritonserver``:
``bin/tritonserver``, the Python backend, and a backend stub per Python version). We
use the binary and its backend directly (not pytriton's Python API): the model is
dfosd's own ``model.py`` in a repository written by ``triton_repo``, so what runs here is
what a production Triton would run.

tritonserver listens on 127.0.0.1 only (HTTP on a private port, gRPC, metrics); the network
reaches the model through dfosd-serve's front (``gateway``), and the management APIs need the
admin key (Triton's restricted-API flags; a random key when none is given).

Process handling (the Linux parts live in ``processes``):

- a work folder holds the model repository and a ``backends/python`` folder with
  links to the backend library and to the stub built for *this* Python's version;
- the stub is linked against ``libpython3.X.so``; the system may have another build of
  the same version, which the stub would pick up and then fail at model start with
  "'_thread.RLock' object has no attribute '_recursion_count'". The running
  interpreter's own library folder goes first on ``LD_LIBRARY_PATH`` (with the wheel's
  bundled libraries after it);
- tritonserver runs in its own session (process group), with a parent-death signal, so
  that Ctrl-C in a terminal reaches us (not it) and we can shut it down in order: SIGTERM,
  wait for in-flight requests (``exit_timeout``), then SIGKILL whatever is left of the
  group (the backend stubs are its children). A killed ``dfosd-serve`` takes the server
  and its stubs with it (``SUPERVISOR``);
- the work folder (repository, backend links) is a fresh temp folder with an owner file
  (pid + process start time). ``kill -9`` leaves it behind, so each start removes the
  folders whose owner is gone: what dfosd-serve writes does not pile up, and a folder
  without our owner file is never touched. ``--repo DIR`` writes the repository there
  only when ``DIR`` is new, empty or an earlier dfosd repository, and never replaces a
  model folder dfosd did not write;
- a backend stub that dies (killed, out of memory) leaves tritonserver answering "ready"
  while every request fails, so ``stub_problem`` watches the stubs' pids and the caller
  restarts the server (``dfosd-serve --max-restarts``) or exits non-zero.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dfosd.core.errors import DfosdError
from dfosd.serving.gateway import ADMIN_APIS, ADMIN_HEADER
from dfosd.serving.processes import (OWNER_FILE, SUPERVISOR, group_pids, make_work_dir,  # noqa: F401 - re-exported
                                     process_start_time, set_parent_death_signal, sweep_stale_work_dirs)
from dfosd.serving.scheduler import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
INSTALL_HINT = ("pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'tritonclient[http,grpc]' "
                "(or dfosd[serve]); --no-deps keeps NumPy 2, which pytriton's metadata would downgrade")


@dataclass(frozen=True)
class TritonDist:
    """Where the pytriton wheel keeps the server, the Python backend and the stubs."""

    root: Path

    @property
    def server(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: str) -> Path:
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"

    @property
    def bundled_libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"


def find_tritonserver() -> TritonDist:
    """The tritonserver distribution inside the installed nvidia-pytriton (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise DfosdError("tritonserver is not installed here (it comes with PyPI's nvidia-pytriton)",
                         hint=INSTALL_HINT)
    dist = TritonDist(Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing = [p for p in (dist.server, dist.python_backend / "libtriton_python.so", dist.stub(version))
               if not p.is_file()]
    if missing:
        raise DfosdError(f"the nvidia-pytriton installation lacks {', '.join(map(str, missing))}"
                         + (f" (no Python {version} backend stub)" if dist.stub(version) in missing else ""),
                         hint=INSTALL_HINT)
    return dist


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_env(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [libdir, str(dist.bundled_libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in parts if p)
    return env


def venv_site_dirs() -> tuple[str, ...]:
    """This virtual environment's site folders, which the stub's Python would not see by itself.

    The stub embeds the base interpreter's libpython, whose prefix is the base install; in a
    venv dfosd and torch may live elsewhere. ``model.py`` adds these with ``site.addsitedir``,
    which also runs their .pth files (editable installs need that). What the stub imported
    before model.py (NumPy, for its own utilities) stays the base install's: observed with a
    --system-site-packages venv holding NumPy 1.26 over a base NumPy 2.4 (PYTHONPATH did not
    change that), which is one more reason tensors cross the stub through DLPack only.
    """
    if sys.prefix == sys.base_prefix:
        return ()
    import site

    own = Path(sys.prefix).resolve()
    return tuple(d for d in site.getsitepackages() if own in Path(d).resolve().parents)


def pythonpath_dirs() -> tuple[str, ...]:
    """This process's PYTHONPATH, absolute: the stub's embedded Python does not read the variable
    (observed: a PYTHONPATH checkout of dfosd was ignored and the installed one served)."""
    return tuple(str(Path(d).resolve()) for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d)


@dataclass
class ServeOptions:
    export_dir: Path
    http_port: int = 8000           # dfosd-serve's front (serving/gateway.py); tritonserver's HTTP is internal
    grpc_port: int = 8001           # tritonserver's gRPC, metrics: on 127.0.0.1 always (see gateway)
    metrics_port: int = 8002
    host: str = "127.0.0.1"          # the front's address: all interfaces only when asked (--host 0.0.0.0)
    triton_http_port: int = 0       # tritonserver's own HTTP on 127.0.0.1 (0: a free port, chosen once)
    admin_key: str | None = None    # opens the management endpoints (logging, repository, trace, shm)
    ui: bool = True                 # the page at /
    max_batch: int = 8
    timeout_s: float = 0.0          # queue timeout per request (0: none)
    request_timeout_s: float = DEFAULT_TIMEOUT_S  # the model fails a request not done this long after it arrived
    max_queue_delay_us: int = 2000
    backend: str = "auto"
    tile_batch: int | None = None
    overlap: int | None = None
    max_pixels: int | None = None
    instances: int = 1
    model_name: str = "dfosd"
    repo: Path | None = None        # keep the generated repository here (default: a temp folder)
    exit_timeout_s: int = 15
    startup_timeout_s: float = 300.0
    log_verbose: int = 0
    log_file: Path | None = None    # server output; default: inherit this process's stdout/stderr
    extra_args: list[str] = field(default_factory=list)


class TritonServer:
    """One tritonserver process serving dfosd's Python model; use as a context manager."""

    def __init__(self, opts: ServeOptions):
        import secrets

        self.opts = opts
        self.http_port = opts.triton_http_port or free_port()
        # Triton refuses its management APIs without this header value: --admin-key, or a secret
        # nobody knows (closed). The front checks it too, with a message.
        self._admin_key = opts.admin_key or secrets.token_urlsafe(32)
        self.dist = find_tritonserver()
        self.proc: subprocess.Popen | None = None
        self._work: Path | None = None
        self._log_handle = None
        self._stubs: dict[int, str | None] = {}  # tritonserver and backend stub pids -> start time, once ready
        self._names: dict[int, str] = {}
        self._watching = False  # the pids above were taken when the server became ready

    # -- setup

    def _write_repository(self, work: Path) -> Path:
        from dfosd.serving.triton_repo import DEFAULT_MAX_PIXELS, RepoOptions, write_repository

        o = self.opts
        repo = o.repo if o.repo is not None else work / "models"
        # KIND_GPU: one instance per visible GPU, each pinned to its device (see python_model).
        kind = "gpu" if _cuda_visible() else "cpu"
        write_repository(o.export_dir, repo, RepoOptions(
            name=o.model_name, kinds=("python",), link="symlink", backend=o.backend, tile_batch=o.tile_batch,
            overlap=o.overlap, max_batch=o.max_batch, max_queue_delay_us=o.max_queue_delay_us,
            queue_timeout_s=o.timeout_s, request_timeout_s=o.request_timeout_s,
            max_pixels=o.max_pixels or DEFAULT_MAX_PIXELS, instances=o.instances,
            python_device=kind, site_dirs=venv_site_dirs(), path_dirs=pythonpath_dirs(),
            progress_dir=str(self.progress_dir) if self.progress_dir else None))
        return repo

    def _backend_dir(self, work: Path) -> Path:
        backends = work / "backends"
        py = backends / "python"
        py.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        links = {"libtriton_python.so": self.dist.python_backend / "libtriton_python.so",
                 "triton_python_backend_utils.py": self.dist.python_backend / "triton_python_backend_utils.py",
                 # Triton looks for the stub beside the backend library; link the one for this Python.
                 "triton_python_backend_stub": self.dist.stub(version)}
        for name, src in links.items():
            if src.exists():
                (py / name).unlink(missing_ok=True)
                (py / name).symlink_to(src)
        return backends

    def command(self, repo: Path, backends: Path) -> list[str]:
        o = self.opts
        return [str(self.dist.server), f"--model-repository={repo}", f"--backend-directory={backends}",
                "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
                f"--exit-timeout-secs={o.exit_timeout_s}", f"--log-verbose={o.log_verbose}",
                # Loopback only: the network reaches the model through dfosd-serve's front (gateway.py).
                f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
                f"--grpc-address={LOOPBACK}", f"--grpc-port={o.grpc_port}",
                f"--metrics-address={LOOPBACK}", f"--metrics-port={o.metrics_port}",
                f"--http-restricted-api={ADMIN_APIS}:{ADMIN_HEADER}={self._admin_key}",
                f"--grpc-restricted-protocol={ADMIN_APIS}:{ADMIN_HEADER}={self._admin_key}",
                # Python-backend shared memory per stub: big enough for one 4096x4096 RGB output
                # up front; it grows in the same steps if a batch needs more.
                "--backend-config=python,shm-default-byte-size=67108864",
                "--backend-config=python,shm-growth-byte-size=67108864",
                # CPU metrics only: on a machine without NVIDIA's driver, GPU metrics only log errors.
                f"--allow-gpu-metrics={'true' if _cuda_visible() else 'false'}",
                *o.extra_args]

    # -- lifecycle

    @property
    def progress_dir(self) -> Path | None:
        """Where the model reports tile progress (serving/progress.py), while the server runs."""
        return self._work / "progress" if self._work is not None else None

    @property
    def http_url(self) -> str:
        """tritonserver's own HTTP endpoint (internal: clients use the front's)."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{LOOPBACK}:{self.opts.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.opts.metrics_port}/metrics"

    def start(self) -> "TritonServer":
        for stale in sweep_stale_work_dirs():
            log.info("removed %s, left by a dfosd-serve that was killed", stale)
        self._work = make_work_dir()
        (self._work / "progress").mkdir()
        self._stubs, self._watching = {}, False
        try:
            repo = self._write_repository(self._work)
            backends = self._backend_dir(self._work)
            cmd = self.command(repo, backends)
            out = None
            if self.opts.log_file is not None:
                self._log_handle = open(self.opts.log_file, "ab")
                out = self._log_handle
            log.info("starting %s", " ".join(cmd))
            supervised = [sys.executable, "-c", SUPERVISOR, str(self.opts.exit_timeout_s + 30), *cmd]
            self.proc = subprocess.Popen(supervised, env=server_env(self.dist), stdout=out,
                                         stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=set_parent_death_signal)
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self, n: int = 30) -> str:
        if self.opts.log_file is None:
            return "(see the server output above)"
        try:
            lines = Path(self.opts.log_file).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until /v2/health/ready answers 200 (all models loaded), or the server exits, or time runs out."""
        deadline = time.monotonic() + (self.opts.startup_timeout_s if timeout_s is None else timeout_s)
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                self.stop()
                raise DfosdError(f"tritonserver exited during start-up (exit code {code}):\n{self._log_tail()}",
                                 hint="check the engines directory and the model's log lines above")
            if http_status(url) == 200:
                # tritonserver and its backend stubs (the supervisor is self.proc, watched by poll())
                self._stubs = {pid: process_start_time(pid) for pid in self.pids() if pid != self.proc.pid}
                self._names = {pid: ("the model's backend stub" if _comm(pid).startswith("triton_python")
                                     else "tritonserver") for pid in self._stubs}
                self._watching = True
                return
            time.sleep(0.25)
        self.stop()
        raise DfosdError(f"tritonserver was not ready after {timeout_s or self.opts.startup_timeout_s:.0f} s:\n"
                         f"{self._log_tail()}", hint="raise --startup-timeout, or check the log")

    def pids(self) -> list[int]:
        """tritonserver and everything in its process group (the backend stubs)."""
        return [] if self.proc is None else group_pids(self.proc.pid)

    def problem(self) -> str | None:
        """Why the server cannot serve any more (None: it can, as far as we can see).

        tritonserver exited, or a backend stub seen at start-up is gone: Triton keeps answering
        ready after a stub dies (observed: 82 s of 500s, tritonserver 2.51), so its health
        endpoints cannot tell."""
        if self.proc is None:
            return "tritonserver is not running"
        if self.proc.poll() is not None:
            return f"tritonserver exited by itself (exit code {self.proc.returncode})"
        for pid, started in self._stubs.items():
            if process_start_time(pid) != started:
                return f"{self._names.get(pid, 'a server process')} (pid {pid}) died"
        if self._watching and "the model's backend stub" not in self._names.values():
            # A Python model always has a stub: none when the server turned ready means it died in
            # between (a kill right after the first 200), and no pid above would ever tell.
            return "the model's backend stub died (none was running when the server became ready)"
        return None

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful exit, then SIGKILL the group's leftovers. Idempotent."""
        code = None
        if self.proc is not None:
            pgid = self.proc.pid
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGTERM)
                    self.proc.wait(timeout=self.opts.exit_timeout_s + 45)  # the supervisor waits +30 s
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=15)
            code = self.proc.returncode
            # The stubs normally exit with the server; anything left in its group goes now.
            deadline = time.monotonic() + 10
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            for pid in group_pids(pgid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        return code

    def __enter__(self) -> "TritonServer":
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _comm(pid: int) -> str:
    """The executable name of ``pid`` (truncated to 15 characters by the kernel), '' if gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cuda_visible() -> bool:
    # Without importing torch (dfosd-serve starts fast): a device node or a visible-devices setting.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists()
