"""What dfosd-serve's front (``gateway``) checks in a request before tritonserver sees it, and its limits.

Plain functions of the request's headers and JSON, so the tests and the front share them; each
refusal is a ``Refused`` with the HTTP status and the reason the client reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod

from dfosd.core.vocab import IMAGE_IN, IMAGE_OUT
from dfosd.serving.upscale_service import RequestError, image_size, parse_color_fix, parse_layout


@dataclass(frozen=True)
class GatewayLimits:
    model: str
    max_pixels: int             # LR pixels per image (the model's --max-pixels)
    max_batch: int              # images per request (the model's max_batch_size)
    scale: int = 4
    header_bytes: int = 64 << 10       # JSON header of a binary request; a whole admin/JSON body
    json_body_bytes: int = 16 << 20    # a request with its pixels as JSON numbers (use binary beyond)
    json_depth: int = 8                # an inference request needs 4
    max_requests: int = 256            # handled at once; more get 503
    inflight_bytes: int = 1 << 30      # input + output bytes of the requests Triton holds at once
    body_timeout_s: float = 60.0       # a body that sends nothing this long is dropped
    request_timeout_s: float = 900.0   # waiting for room + Triton's answer
    admin_key: str | None = None


class Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def json_depth(value, limit: int) -> int:
    """Nesting depth of a parsed JSON value, without recursion; Refused past ``limit``."""
    depth, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (list, dict)):
            if d > limit:
                raise Refused(400, f"the request JSON is nested more than {limit} deep")
            depth = max(depth, d)
            items = v.values() if isinstance(v, dict) else v
            todo.extend((x, d + 1) for x in items if isinstance(x, (list, dict)))
    return depth


def parse_json(raw: bytes, limit: int):
    try:
        value = json.loads(raw)
    except RecursionError:
        raise Refused(400, f"the request JSON is nested more than {limit} deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Refused(400, f"the request is not valid JSON ({exc})") from None
    json_depth(value, limit)
    return value


def _scalar_params(params, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict) or any(isinstance(v, (list, dict)) for v in params.values()):
        raise Refused(400, f"{where} parameters must be a JSON object of plain values")
    if any(k.startswith("shared_memory") for k in params):
        raise Refused(400, f"{where}: shared-memory tensors are not served over the network")
    return params


def check_infer_header(head, limits: GatewayLimits, binary: bool) -> tuple[int, int]:
    """(binary pixel bytes the body must carry, output bytes) of a checked inference header."""
    if not isinstance(head, dict):
        raise Refused(400, "the request must be a JSON object")
    params = _scalar_params(head.get("parameters"), "request")
    try:
        layout = parse_layout(params.get("layout"))
        parse_color_fix(params.get("color_fix"), "none")
    except RequestError as exc:
        raise Refused(400, exc.message) from None
    inputs = head.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise Refused(400, f"the request must have exactly one input, {IMAGE_IN}")
    inp = inputs[0]
    if inp.get("name") != IMAGE_IN:
        raise Refused(400, f"unexpected input {inp.get('name')!r}: the model takes {IMAGE_IN}")
    if inp.get("datatype") != "UINT8":
        raise Refused(400, f"{IMAGE_IN} must be UINT8 (one byte per channel), got {inp.get('datatype')!r}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise Refused(400, f"{IMAGE_IN} shape must be a list of sizes, got {shape!r}")
    try:
        h, w = image_size(tuple(shape), layout)
    except RequestError as exc:
        raise Refused(400, exc.message) from None
    if shape[0] > limits.max_batch:
        raise Refused(400, f"{shape[0]} images in one request: this server takes at most {limits.max_batch}")
    if h * w > limits.max_pixels:
        raise Refused(400, f"{IMAGE_IN} {w}x{h} has {h * w} pixels, more than this server's limit of "
                           f"{limits.max_pixels} per image")
    outputs = head.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("name") == IMAGE_OUT for o in outputs):
        raise Refused(400, f"the model has one output, {IMAGE_OUT}")
    for o in outputs:
        _scalar_params(o.get("parameters"), IMAGE_OUT)
    in_params = _scalar_params(inp.get("parameters"), IMAGE_IN)
    pixels = prod(shape)
    if binary and "data" not in inp:
        if in_params.get("binary_data_size") != pixels:
            raise Refused(400, f"{IMAGE_IN} binary_data_size must be {pixels} bytes for shape {shape}")
        return pixels, pixels * limits.scale ** 2
    data = inp.get("data")
    if not isinstance(data, list) or len(data) != pixels:
        raise Refused(400, f"{IMAGE_IN} data must be a flat list of {pixels} numbers for shape {shape}")
    return 0, pixels * limits.scale ** 2
