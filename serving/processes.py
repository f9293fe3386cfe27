"""The processes of dfosd-serve: tritonserver's supervisor, process groups, and work folders.

Kept apart from ``serve`` (which starts and watches the server) because these are plain
Linux process facts (/proc, prctl) with no Triton in them; see ``serve``'s docstring for why
each exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path


# tritonserver runs under this small supervisor (``python -c``, no imports beyond the standard
# library), the leader of their process group. Why: a backend stub is tritonserver's child, and
# when tritonserver exits during a model load (SIGTERM from a killed dfosd-serve), the stub was
# left running for good (observed, with the model in its memory). The supervisor forwards
# SIGTERM/SIGINT to tritonserver, kills it if it is not gone ``exit_timeout + 30`` s later, and
# once it is gone, for whatever reason, kills what is left of the group; it exits with
# tritonserver's exit code. Both get a parent-death signal, so a SIGKILL of dfosd-serve (or of the
# supervisor) still ends the whole group.
SUPERVISOR = r"""
import ctypes, os, signal, subprocess, sys, time
def pdeathsig():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
grace = float(sys.argv[1])
server = subprocess.Popen(sys.argv[2:], preexec_fn=pdeathsig)
deadline = []
def forward(signum, frame):
    if not deadline:
        deadline.append(time.monotonic() + grace)
    try:
        server.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
signal.signal(signal.SIGHUP, forward)
while server.poll() is None:
    if deadline and time.monotonic() > deadline[0]:
        server.kill()
    time.sleep(0.1)
me, group = os.getpid(), os.getpgrp()
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != me:
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)
"""


def set_parent_death_signal() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except Exception:  # not Linux: the explicit shutdown still applies
        pass


def group_pids(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


WORK_PREFIX = "dfosd-serve-"
OWNER_FILE = "dfosd-serve-owner.json"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), None if it is gone or a zombie.
    With the pid it names one process: a pid reused by another process has another start time."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def make_work_dir(parent: Path | None = None) -> Path:
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent))
    owner = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "pid_ns": _pid_namespace()}
    (work / OWNER_FILE).write_text(json.dumps(owner) + "\n")
    return work


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def sweep_stale_work_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the work folders of dfosd-serve processes that no longer run (killed with SIGKILL).

    Only folders named ``dfosd-serve-*`` holding our owner file are candidates; a folder whose
    owner file is unreadable, or whose owner still runs, stays. So does one written in another
    pid namespace (a container sharing the temp folder: its pids mean nothing here), and one
    without a recorded start time whose pid is alive (no /proc to tell a reused pid apart)."""
    removed = []
    here = _pid_namespace()
    for work in Path(parent or tempfile.gettempdir()).glob(WORK_PREFIX + "*"):
        try:
            owner = json.loads((work / OWNER_FILE).read_text())
            pid, started = int(owner["pid"]), owner["start_time"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner.get("pid_ns", here) != here:
            continue  # another pid namespace's: cannot be judged from here
        if (process_start_time(pid) == started) if started is not None else _pid_alive(pid):
            continue  # its dfosd-serve still runs
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work)
    return removed
