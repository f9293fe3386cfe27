"""A tiny writer for protobuf text format, enough for Triton's ``config.pbtxt``.

Triton's schema (``model_config.proto``) is only needed to *check* what we write (the
tests parse every file with tritonclient's ``model_config_pb2``); writing text by hand
keeps ``dfosd triton-repo`` free of grpc/protobuf imports.

Values: dict -> message, list of dicts -> repeated message, list of scalars -> repeated
scalar, ``Enum("TYPE_UINT8")`` -> bare enum identifier, ``Map({...})`` -> a proto map
(written as repeated ``{ key: ... value: ... }`` entries), str/int/float/bool -> scalars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Enum:
    """An enum value, written without quotes (``kind: KIND_CPU``)."""

    name: str


@dataclass(frozen=True)
class Map:
    """A protobuf map field (``parameters``, ``cc_model_filenames``, ``input_map``)."""

    items: dict


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string literal is a valid text-format string literal
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a protobuf scalar")


def _field(key: str, value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(value, Map):
        value = [{"key": k, "value": v} for k, v in value.items.items()]
    if isinstance(value, dict):
        return [f"{pad}{key} {{", *_body(value, indent + 1), f"{pad}}}"]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, dict) for v in value):
            lines = []
            for v in value:
                lines += _field(key, v, indent)
            return lines
        return [f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _body(message: dict, indent: int) -> list[str]:
    lines = []
    for key, value in message.items():
        if value is None:
            continue
        lines += _field(key, value, indent)
    return lines


def to_pbtxt(message: dict) -> str:
    """Text format of a message given as nested dicts (``None`` fields are left out)."""
    return "\n".join(_body(message, 0)) + "\n"
