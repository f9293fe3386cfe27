"""Checkpoint containers: safetensors, or a ``torch.save`` pickle read with
``torch.load(weights_only=True)`` only, never running pickled code; what a file that is not a
checkpoint is (an image, JSON, ONNX, ...); a zip's declared sizes checked before anything is
inflated. ``core/readers.py`` reads the layouts inside."""

from __future__ import annotations

import json
from pathlib import Path

from dfosd.core.errors import DfosdError


def load_raw(path: Path) -> tuple[dict, dict]:
    """(tensors or plain containers, safetensors header) of a file, never running pickled code."""
    if not path.is_file():
        raise DfosdError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)
    kind = None if looks_safetensors else not_a_checkpoint(path)
    if kind:
        raise DfosdError(f"{path} is {kind}, not a checkpoint",
                         hint="pass the model file itself: .safetensors, .pkl or .pth")
    if path.suffix == ".safetensors" or looks_safetensors:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise DfosdError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    check_zip_sizes(path)
    return _load_pickle(path), {}


# Files people pass by mistake, by their first bytes (or name, for formats without a magic number).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"\x1f\x8b", "a gzip archive"),
          (b"GGUF", "a GGUF model file"), (b"\x7fELF", "an executable"), (b"%PDF", "a PDF document"))
_SUFFIXES = {".onnx": "an ONNX graph", ".json": "a JSON file", ".yaml": "a YAML file", ".yml": "a YAML file",
             ".txt": "a text file", ".plan": "a TensorRT plan", ".engine": "a TensorRT plan",
             ".pt2": "an AOTInductor package", ".xml": "an OpenVINO model", ".webp": "a WebP image"}
JSON_SNIFF_LIMIT = 64 << 20
# torch.save writes its zip entries uncompressed: declared sizes far beyond the file's own are a zip bomb
ZIP_INFLATION_LIMIT = 4


def not_a_checkpoint(path: Path) -> str | None:
    """What a file that cannot be a checkpoint is ("a PNG image", "a JSON file", ...), else None."""
    with open(path, "rb") as f:
        head = f.read(16)
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if path.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[path.suffix.lower()]
    if head.lstrip()[:1] in (b"{", b"[") and not head.startswith(b"\x80"):
        return "a JSON file" if _is_json(path) else None
    return None


def _is_json(path: Path) -> bool:
    if path.stat().st_size > JSON_SNIFF_LIMIT:  # not read whole just to name it
        return False
    try:
        json.loads(path.read_text())
        return True
    except (ValueError, UnicodeDecodeError, OSError):
        return False


def check_zip_sizes(path: Path) -> None:
    """Refuse a zip (torch.save's container) whose entries declare more bytes than it could hold
    stored, before anything is inflated: a 2 MB file must not take gigabytes to reject."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DfosdError(f"checkpoint {path} is a damaged zip archive ({exc})") from None
    declared = sum(e.file_size for e in entries)
    size = path.stat().st_size
    if declared > ZIP_INFLATION_LIMIT * size + (1 << 20):
        raise DfosdError(f"checkpoint {path} is a zip of {size:,} bytes whose entries declare {declared:,} bytes "
                         f"when inflated; torch.save stores its tensors uncompressed, so it was refused before "
                         "reading (a zip bomb, or not a torch.save file)",
                         hint="pass the checkpoint as its project saved it")
    if entries and not any(e.filename.endswith("data.pkl") for e in entries):
        raise DfosdError(f"{path} is a zip archive without data.pkl: not a torch.save checkpoint",
                         hint="unpack it and pass the checkpoint inside")


def safetensors_metadata(path: Path) -> dict:
    """The header metadata of a safetensors file, without reading its tensors ({} when it is not one)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - not a (readable) safetensors file
        return {}


def _load_pickle(path: Path) -> dict:
    import pickle

    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "global" in line.lower()), first[0] if first else "")
        raise DfosdError(
            f"checkpoint {path} is a pickle that needs more than tensors to load; it was refused and not "
            f"unpickled ({detail.strip()})",
            hint="pickles can run code when loaded: convert it with its own project's code in a sandbox to "
                 "safetensors, or ask its authors for a tensors-only file") from None
    except Exception as exc:  # torch raises many types for files that are not checkpoints at all
        raise DfosdError(f"checkpoint {path} is neither safetensors nor a torch.save pickle: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(obj, dict):
        raise DfosdError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors")
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise DfosdError(f"checkpoint {path} has {len(odd)} key(s) that are not names (e.g. {odd[0]!r}); "
                         "no supported layout has them")
    return obj


def is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)
