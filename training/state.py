"""Training-state files: everything ``--resume`` needs to continue a run at the same step.

``<log_dir>/states/state-0001000.pt`` holds the trainable tensors (generator LoRA + embedding,
discriminator LoRA + embedding + head), both optimizers, both LR schedulers, the fp16 gradient
scalers, the RNG states (torch CPU and CUDA, numpy, python), the data position and the
configuration. The loop draws every random number from generators seeded by ``(seed, step)``,
so a resumed run is exact even without the saved RNG states; they are restored anyway for any
library code that uses the global generators.

Files are written to a temporary name and renamed (a crash never leaves half a state), and read
with ``torch.load(weights_only=True)``: no pickled code is executed on resume.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfosd.core.atomic import atomic_target
from dfosd.core.errors import DfosdError, problems_error

STATE_FORMAT = "dfosd-train-state/1"
STATE_DIR = "states"
_STATE_RE = re.compile(r"^state-(\d+)\.pt$")


def state_path(log_dir: Path, step: int) -> Path:
    return Path(log_dir) / STATE_DIR / f"state-{step:07d}.pt"


def list_states(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the state files in ``folder`` or ``folder/states``, oldest first."""
    folder = Path(folder)
    found = []
    for d in (folder, folder / STATE_DIR):
        if d.is_dir():
            for p in d.iterdir():
                m = _STATE_RE.match(p.name)
                if m and p.is_file():
                    found.append((int(m.group(1)), p))
    return sorted(set(found))


def resolve_resume(path: str | Path) -> Path:
    """A state file, or the newest state in a folder (a log dir or its states/)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        states = list_states(p)
        if states:
            return states[-1][1]
        raise DfosdError(f"--resume {p}: no state-NNNNNNN.pt in it or in {p / STATE_DIR}",
                         hint="pass a state file or the --log-dir of an earlier run")
    raise DfosdError(f"--resume {p} does not exist", hint="pass a state file or the --log-dir of an earlier run")


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    torch.random.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    n = rng["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(path: Path, state: dict[str, Any], *, keep: int | None = None) -> Path:
    """Atomic write; then delete all but the ``keep`` newest states in the same folder."""
    path = Path(path)
    with atomic_target(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state}, tmp)
    if keep is not None:
        for _, old in list_states(path.parent)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or pickled-code files all mean "not a state"
        raise DfosdError(f"--resume {path} is not a readable dfosd training state: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DfosdError(f"--resume {path} is not a dfosd training state (format "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                         f"expected {STATE_FORMAT!r})")
    return state


def check_compatible(state: dict[str, Any], config: dict[str, Any], must_match, *, data_id: str,
                     path: Path) -> None:
    """Every setting that would make the resumed run differ from the saved one, in one error."""
    saved = state["config"]
    problems = [f"{k}: saved run {saved.get(k)!r}, now {config.get(k)!r}" for k in must_match
                if saved.get(k) != config.get(k)]
    if state.get("data_id") != data_id:
        problems.append(f"the --data images differ from the saved run's ({state.get('data_files')} files then); "
                        "the data order would change")
    if state["step"] > config["steps"]:
        problems.append(f"the state is at step {state['step']}, beyond --steps {config['steps']}")
    if problems:
        raise problems_error(f"cannot resume from {path}", problems,
                             hint="resume with the saved run's settings (only --steps, intervals, "
                                  "--out, --log-dir, --device and workers may change), or start a new run")
