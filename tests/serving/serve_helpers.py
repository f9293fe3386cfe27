"""What the serving tests share: dfosd-serve as a subprocess, test images, tritonclient calls.

One dfosd-serve (tritonserver + its front) serves the whole test session (tests/serving/conftest.py);
test_serving_server.py's last test stops it with SIGINT and checks that nothing is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MAX_PIXELS = 96 * 96   # small, so that "oversized" is cheap to send
MAX_BATCH = 4
TILE_BATCH = 2
ADMIN_KEY = "test-admin-key"


def descendants(pid: int) -> set[int]:
    """pid's live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status(url: str) -> int | None:
    from dfosd.serving.serve import http_status

    return http_status(url)


class ServeProcess:
    """``python -m dfosd.serving.cli`` (= dfosd-serve) on free loopback ports."""

    def __init__(self, engines: Path, log: Path, *extra: str, tmpdir: Path | None = None):
        from dfosd.serving.serve import free_port

        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log, self.engines = log, engines
        # No --host: the default (loopback only) is what test_listens_on_loopback_only checks.
        cmd = [sys.executable, "-m", "dfosd.serving.cli", "--engines", str(engines),
               "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
               "--max-batch", str(MAX_BATCH), "--tile-batch", str(TILE_BATCH), "--max-pixels", str(MAX_PIXELS),
               "--backend", "onnxruntime", "--log-file", str(log), *extra]
        self.out = open(log.with_suffix(".cli.txt"), "wb")
        env = dict(os.environ, TMPDIR=str(tmpdir)) if tmpdir else None  # where its work folder goes
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env)
        self.seen: set[int] = set()  # every tritonserver / stub pid observed while it ran

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self):
        return f"grpc://127.0.0.1:{self.grpc}"

    def watch(self) -> None:
        if self.proc.poll() is None:
            self.seen |= descendants(self.proc.pid)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch()
            if self.proc.poll() is not None:
                raise AssertionError(f"dfosd-serve exited ({self.proc.returncode}):\n{self.output()}")
            if status(f"{self.http_url}/v2/health/ready") == 200:
                self.watch()
                return
            time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        if not self.out.closed:
            self.out.flush()
        text = self.log.with_suffix(".cli.txt").read_text(errors="replace")
        if self.log.is_file():
            text += "\n--- server log ---\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        return text

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.watch()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.proc.pid) | {self.proc.pid}:
                    os.kill(pid, signal.SIGKILL)
                raise
        self.out.close()
        return self.proc.returncode


def image(h, w, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def http_infer(url, array, params=None, dtype="UINT8"):
    import tritonclient.http as th

    client = th.InferenceServerClient(url.split("://")[1])
    inp = th.InferInput("lr_image", list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    out = [th.InferRequestedOutput("sr_image", binary_data=True)]
    try:
        return client.infer("dfosd", [inp], parameters=params or {}, outputs=out).as_numpy("sr_image")
    finally:
        client.close()  # an open keep-alive connection makes tritonserver wait at shutdown


def grpc_infer(url, array, params=None):
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(url.split("://")[1])
    inp = tg.InferInput("lr_image", list(array.shape), "UINT8")
    inp.set_data_from_numpy(array)
    try:
        return client.infer("dfosd", [inp], parameters=params or {}).as_numpy("sr_image")
    finally:
        client.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
