"""What dfosd wrote into a model repository, file by file: the only files it ever removes there.

The marker (``.dfosd-repo.json``) lists the model folders a run wrote and, per model, the files
in it (paths relative to the model folder). Rewriting a model (``dfosd-serve --repo R`` again,
or ``dfosd triton-repo`` into the same folder) removes only the files the marker lists for it,
so a file a user put inside ``R/dfosd/`` stays, and a file of ours would only replace one of
the user's if the marker said it was ours (otherwise the run stops and names it). A marker from
before file records lists models only: then files are replaced by name, nothing else removed.
"""

from __future__ import annotations

import json
from pathlib import Path

from dfosd.core.errors import DfosdError
from dfosd.core.manifest import write_text_atomic

MARKER = ".dfosd-repo.json"  # marks a repository written here, so rewriting it may replace our models


class RepoRecords:
    def __init__(self, repo: Path):
        self.repo = repo
        try:
            data = json.loads((repo / MARKER).read_text())
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        self.models: dict[str, str] = dict(data.get("models") or {})
        self.files: dict[str, list[str]] = {m: list(f) for m, f in (data.get("files") or {}).items()}

    def save(self, engines: str, models: dict[str, str]) -> None:
        files = {m: sorted(set(f)) for m, f in self.files.items() if m in models}
        write_text_atomic(self.repo / MARKER, json.dumps({"engines": engines, "models": models, "files": files},
                                                         indent=2) + "\n")

    def replace_files(self, model: str, new: list[str], claim) -> None:
        """Before writing ``new`` (paths in ``repo/model``): refuse to replace a file the records do not
        list, record the claim (``claim()`` saves the marker), and remove our files that ``new`` drops."""
        folder = self.repo / model
        old = self.files.get(model)
        if old is not None:
            theirs = [rel for rel in new if rel not in old and ((folder / rel).exists() or (folder / rel).is_symlink())]
            if theirs:
                raise DfosdError(f"{folder} holds {', '.join(theirs)}, which dfosd did not write; it would be replaced",
                                 hint="move it away, or choose another --repo / --name")
        self.files[model] = sorted(set(old or []) | set(new))
        claim()  # a run cut short still knows these files are ours
        for rel in sorted(set(old or []) - set(new)):
            path = folder / rel
            if path.is_symlink() or path.is_file():
                path.unlink()
            for parent in path.parents:  # folders emptied by that, up to the model folder
                if parent == folder or folder not in parent.parents:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
        self.files[model] = list(new)
