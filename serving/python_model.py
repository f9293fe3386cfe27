"""The Triton Python-backend model: dfosd's runtime serving images of any size.

Runs inside Triton's backend stub process (``triton_python_backend_utils`` exists only
there, hence the imports inside methods). The model directory's ``config.pbtxt``
parameters say where the engines are and how to tile (see ``triton_repo``). ``execute``
hands its requests to a ``FairTileScheduler`` (serving/scheduler.py) and returns at once;
the scheduler's thread runs tile batches filled round-robin across all pending requests and
answers each request through its response sender, so a small request is not starved behind
a big one, and requests time out (``request_timeout_s``) instead of waiting without end.

Tensors cross the stub boundary through DLPack (torch), never through
``pb_utils.Tensor(name, ndarray)`` / ``as_numpy()``: the stub that PyPI's
nvidia-pytriton 0.7.0 ships was built against NumPy 1.x, and with NumPy 2 in the
environment its NumPy path reads input arrays as zeros and returns empty outputs
(observed here: numpy 2.4.6). DLPack is independent of NumPy's ABI and copies nothing.

Request parameters (optional): ``layout`` = ``HWC`` (default) or ``CHW``; ``overlap`` =
tile overlap in LR pixels (default from the config); ``color_fix`` = none, adain or
wavelet (default: the export family's, as dfosd-trt-run). A bad request gets an error
response naming the problem; the model keeps serving.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from dfosd.core.errors import DfosdError
from dfosd.core.vocab import IMAGE_IN, IMAGE_OUT
from dfosd.serving.scheduler import DEFAULT_TIMEOUT_S, FairTileScheduler, RequestTimeout
from dfosd.serving.upscale_service import (RequestError, UpscaleRequest, UpscaleService, parse_overlap,
                                            parse_parameters)


def config_parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def engines_path(value: str, version_dir: Path) -> Path:
    """``engines`` parameter: absolute, or relative to the model's version folder."""
    path = Path(value)
    return path if path.is_absolute() else version_dir / path


def _triton_error(pb_utils, message: str, code: str):
    value = getattr(pb_utils.TritonError, code, None)  # error codes: Triton 23.x and later
    return pb_utils.TritonError(message) if value is None else pb_utils.TritonError(message, value)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.log = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        if args.get("model_instance_kind") == "GPU":
            import torch

            torch.cuda.set_device(int(args["model_instance_device_id"]))
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        tile_batch = params.get("tile_batch")
        self.service = UpscaleService.from_export(
            engines_path(params.get("engines", "engines"), version_dir),
            backend=params.get("backend", "auto"),
            tile_batch=int(tile_batch) if tile_batch else None,
            overlap=int(params["overlap"]) if params.get("overlap") else None,
            max_pixels=int(params.get("max_pixels", "1048576")),
            say=lambda m: self.log.log_info(f"dfosd: {m}"))
        runner = self.service.runner
        timeout_s = float(params.get("request_timeout_s") or DEFAULT_TIMEOUT_S)
        self.scheduler = FairTileScheduler(self.service, timeout_s=timeout_s,
                                           progress_dir=params.get("progress_dir") or None).start()
        self.log.log_info(f"dfosd: serving {runner.export_dir} ({runner.backend.describe()}, {runner.precision}, "
                          f"tile {runner.tile}, tile batch {runner.batch}; tiles scheduled fairly across requests, "
                          f"request timeout {timeout_s:g} s)")

    def _inputs(self, request) -> UpscaleRequest:
        import torch
        import triton_python_backend_utils as pb_utils

        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_IN)
        if tensor is None:
            raise RequestError(f"the request has no input named {IMAGE_IN}")
        # Not copied here: the service copies each image once, after checking it, and before
        # execute() returns (the request's memory is not ours after that).
        images = torch.from_dlpack(tensor.to_dlpack())
        raw = request.parameters() if hasattr(request, "parameters") else "{}"
        params = parse_parameters(raw)
        return UpscaleRequest(images, params.get("layout"),
                              parse_overlap(params.get("overlap"), self.service.default_tiling.overlap),
                              params.get("color_fix"))

    def _response(self, result):
        import triton_python_backend_utils as pb_utils
        from torch.utils.dlpack import to_dlpack

        if isinstance(result, RequestTimeout):  # not the client's fault: UNAVAILABLE
            return pb_utils.InferenceResponse(error=_triton_error(pb_utils, str(result), "UNAVAILABLE"))
        if isinstance(result, RequestError):  # the client's fault: INVALID_ARG (HTTP 400), not INTERNAL (500)
            return pb_utils.InferenceResponse(error=_triton_error(pb_utils, str(result), "INVALID_ARG"))
        if isinstance(result, DfosdError):  # e.g. NonFiniteOutput: the engines made NaN, no black image is sent
            self.log.log_error(f"dfosd: {result}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
        if isinstance(result, BaseException):  # a bug: answer this request, keep serving, log the traceback
            self.log.log_error(f"dfosd: {''.join(traceback.format_exception(result))}")
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"internal error: {type(result).__name__}: {result}"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack(IMAGE_OUT, to_dlpack(result))])

    def execute(self, requests):
        # Hand the requests to the scheduler and return at once (None): each gets its one final
        # response through its response sender when its last tile is blended, and Triton can hand
        # this instance the next requests meanwhile, so their tiles share the runner fairly with
        # the ones already running (serving/scheduler.py).
        import triton_python_backend_utils as pb_utils

        for request in requests:
            sender = request.get_response_sender()

            def done(result, sender=sender):
                try:
                    response = self._response(result)
                except Exception as exc:  # noqa: BLE001 - e.g. the output could not be handed over
                    response = self._response(exc)
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

            try:
                upscale_request = self._inputs(request)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                done(exc)
                continue
            request_id = request.request_id() if hasattr(request, "request_id") else None
            self.scheduler.submit(upscale_request, done, request_id)
        return None

    def finalize(self):
        self.scheduler.close()
        self.service = None
