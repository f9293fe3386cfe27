"""Runtime caches inside an export folder, checked like the export's own files.

A cache (ONNX Runtime's optimized graphs, OpenVINO's compiled blobs) is what actually runs,
so each of its files is recorded with its sha256 and size when it is written, in the
export's runtime records (``ExportDir.update_runtime_record``, ``runtime.json``), and
checked when it is loaded: sizes only past ``QUICK_CHECK_BYTES`` when the export was opened
with ``check="quick"``, every hash with ``check="full"`` (as for the ONNX files). A file
missing, truncated or changed since it was written is removed and rebuilt, with one warning.

The record also holds the cache's identity (runtime version, CPU, options, the export's
build key); a cache of another identity is emptied of the files its record lists and
rebuilt. Files are named relative to the cache folder, so the cache moves with the export.

What may be deleted is only what the record lists, in dfosd's own folder: a cache folder
that is a symlink, or not a folder, is not used at all (never written to, never emptied),
and files the record does not list are left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from dfosd.core.manifest import ExportDir, changed_files, file_record

log = logging.getLogger(__name__)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


class CacheFolder:
    """One backend's cache folder in one export, e.g. ``<export>/onnxruntime-optimized``.

    Entries are keyed (a part's stem); each entry is the set of files that part's cache
    consists of. ``usable`` is False when the folder cannot be used safely (the backend
    then runs without a cache)."""

    def __init__(self, export: ExportDir, folder_name: str, record_key: str, identity: dict, log=log):
        self.export, self.key, self.identity, self.log = export, record_key, identity, log
        self.folder = export.path / folder_name
        self.quick = export.check != "full"
        self.usable = self._open()

    def _open(self) -> bool:
        folder = self.folder
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            self.log.warning("%s is a symlink or not a folder: running without a cache there (dfosd writes and "
                             "deletes cache files only in its own folder inside the export)", folder)
            return False
        record = self.export.runtime_record(self.key)
        if isinstance(record, dict) and record.get("identity") != self.identity:
            have = record.get("identity") if isinstance(record.get("identity"), dict) else {}
            why = ", ".join(k for k in self.identity if have.get(k) != self.identity[k]) or "another record"
            files = sorted({n for e in self._entries(record).values() for n in e})
            self.log.warning("%s is stale (%s): rebuilding %d file(s)", folder, why, len(files))
            self._remove(files)
            record = None
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            self.log.warning("%s: running without a cache (%s)", folder, exc)
            return False
        if not isinstance(record, dict) and not self.export.write_runtime_record(
                self.key, {"identity": self.identity, "entries": {}}):
            self.log.warning("%s: running without a cache (the export folder cannot be written)", folder)
            return False
        return True

    @staticmethod
    def _entries(record) -> dict[str, dict[str, dict]]:
        entries = record.get("entries") if isinstance(record, dict) else None
        return entries if isinstance(entries, dict) else {}

    def _current(self) -> dict[str, dict[str, dict]]:
        record = self.export.runtime_record(self.key)
        if not isinstance(record, dict) or record.get("identity") != self.identity:
            return {}
        return self._entries(record)

    def _remove(self, names: Iterable[str]) -> None:
        """Delete recorded files of this folder (a symlink is removed itself, its target never)."""
        if self.folder.is_symlink() or not self.folder.is_dir():
            return
        for name in names:
            p = self.folder / name
            if _plain_name(name) and (p.is_file() or p.is_symlink()):
                try:
                    p.unlink(missing_ok=True)
                except OSError as exc:  # a read-only export: the record still goes, the file stays
                    self.log.warning("%s: cannot remove it (%s)", p, exc)

    def path(self, name: str) -> Path:
        return self.folder / name

    def lookup(self, entry: str) -> list[Path] | None:
        """The files of ``entry`` when recorded and intact; None when they must be built. A damaged
        entry (missing, truncated or changed file) is removed with a warning."""
        if not self.usable:
            return None
        files = self._current().get(entry)
        if not isinstance(files, dict) or not files or not all(_plain_name(n) for n in files):
            return None
        bad = [n for n in files if (self.folder / n).is_symlink()] or changed_files(self.folder, files,
                                                                                     quick=self.quick)
        if bad:
            damaged = [n for n in bad if (self.folder / n).exists() or (self.folder / n).is_symlink()]
            # A file that is simply gone (a copy of the export without its cache folder) is built
            # again quietly; one that is there but not what was written is a damaged cache: say so.
            (self.log.warning if damaged else self.log.info)(
                "%s: %s missing, truncated or changed since it was written: rebuilding it", self.folder,
                ", ".join(sorted(bad)))
            self.forget(entry)
            return None
        return [self.folder / n for n in files]

    def forget(self, entry: str) -> None:
        """Drop ``entry``: its recorded files and its record."""
        if not self.usable:
            return
        self._remove(self._current().get(entry) or {})
        self._update(lambda entries: entries.pop(entry, None))

    def commit(self, entry: str, names: list[str]) -> None:
        """Record the files just written for ``entry`` (hashed now: what is recorded is what is there)."""
        files = {n: file_record(self.folder / n) for n in names}
        if not self._update(lambda entries: entries.__setitem__(entry, files)):
            self.log.warning("%s: could not record %s; it will be rebuilt next time", self.folder, entry)

    def _update(self, change) -> bool:
        def update(record):
            if not isinstance(record, dict) or record.get("identity") != self.identity:
                record = {"identity": self.identity, "entries": {}}
            entries = dict(self._entries(record))
            change(entries)
            return {**record, "entries": entries}

        return self.export.update_runtime_record(self.key, update)


class CacheFolders:
    """A backend's cache folder per export it loads from, opened (and its identity checked) once."""

    def __init__(self, folder_name: str, record_key: str, log=log):
        self.folder_name, self.record_key, self.log = folder_name, record_key, log
        self._open: dict[Path, CacheFolder] = {}

    def get(self, export: ExportDir, identity) -> CacheFolder:
        """``identity``: a callable giving the identity for ``export`` (called once per export)."""
        key = export.path.resolve()
        if key not in self._open:
            self._open[key] = CacheFolder(export, self.folder_name, self.record_key, identity(export), self.log)
        return self._open[key]
