"""Client of a dfosd model served by Triton (``dfosd-serve`` or a production Triton).

``UpscaleClient(url)`` talks HTTP (``http://host:port``, or just ``host:port``) or gRPC
(``grpc://host:port``) through tritonclient, reads the model's tile, scale and limits from
its config, and upscales uint8 RGB images of any size: the server tiles and blends.

Per-image problems (the server rejects the image, the connection drops) raise
``RemoteImageError``, an ``ImageInputError``, so ``dfosd-trt-run --server`` reports that
image and goes on, exactly as for a corrupt file. A server that is not there or not ready
at start-up is a ``DfosdError`` (nothing can be done).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from dfosd.core.errors import DfosdError, ImageInputError
from dfosd.core.vocab import IMAGE_IN, IMAGE_OUT

PROTOCOLS = ("http", "grpc")
DEFAULT_TIMEOUT_S = 600.0  # a large image on a CPU server takes minutes
CLIENT_HINT = "pip install 'tritonclient[http,grpc]' (or dfosd[serve])"


class RemoteImageError(ImageInputError):
    """The server could not upscale one image (rejected it, failed, or could not be reached)."""


def parse_server_url(url: str) -> tuple[str, str]:
    """``http://h:p`` / ``grpc://h:p`` / ``h:p`` -> (protocol, "h:p")."""
    raw = url.strip()
    parsed = urlparse(raw if "://" in raw else f"http://{raw}")
    if parsed.scheme not in PROTOCOLS or not parsed.hostname:
        raise DfosdError(f"--server {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    if parsed.path not in ("", "/"):
        raise DfosdError(f"--server {url!r}: give the server's address only (no path)")
    try:
        port = parsed.port or (8000 if parsed.scheme == "http" else 8001)
    except ValueError:
        raise DfosdError(f"--server {url!r}: the port is not a number") from None
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return parsed.scheme, f"{host}:{port}"


@dataclass(frozen=True)
class ModelInfo:
    """What the served model's config says (written by triton_repo.python_model_parameters)."""

    tile: int
    scale: int
    overlap: int
    tile_batch: int
    max_pixels: int
    precision: str
    backend: str
    color_fix: str = "none"  # what the model applies when a request names none (the family's)

    @classmethod
    def from_parameters(cls, params: dict[str, str], model: str) -> "ModelInfo":
        try:
            return cls(tile=int(params["tile"]), scale=int(params["scale"]), overlap=int(params["overlap"]),
                       tile_batch=int(params["tile_batch"]), max_pixels=int(params["max_pixels"]),
                       precision=params.get("precision", ""), backend=params.get("backend", ""),
                       color_fix=params.get("color_fix") or "none")
        except (KeyError, ValueError) as exc:
            raise DfosdError(f"model {model!r} is not a dfosd model (its config lacks parameter {exc})",
                             hint="serve it with dfosd-serve, or write the repository with dfosd triton-repo") from None


class UpscaleClient:
    def __init__(self, url: str, *, model: str = "dfosd", timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.protocol, self.address = parse_server_url(url)
        self.model = model
        self.timeout_s = timeout_s
        try:
            if self.protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
            from tritonclient.utils import InferenceServerException
        except ImportError as exc:
            raise DfosdError(f"tritonclient does not import here ({exc})", hint=CLIENT_HINT) from exc
        self._tc = tc
        self._error_types = (InferenceServerException, OSError)
        if self.protocol == "http":
            self._client = tc.InferenceServerClient(self.address, connection_timeout=min(timeout_s, 60.0),
                                                    network_timeout=timeout_s)
        else:
            self._client = tc.InferenceServerClient(self.address)
        self.info = self._model_info()

    def _model_info(self) -> ModelInfo:
        where = f"{self.protocol}://{self.address}"
        try:
            live = self._client.is_server_live()
            ready = live and self._client.is_model_ready(self.model)
        except self._error_types as exc:
            raise DfosdError(f"no Triton server answers at {where} ({_message(exc)})",
                             hint="start one: dfosd-serve --engines DIR (or check --server)") from None
        if not ready:
            raise DfosdError(f"the server at {where} has no ready model {self.model!r}",
                             hint="is it still loading? check the server's log")
        if self.protocol == "http":
            config = self._client.get_model_config(self.model)
        else:
            config = self._client.get_model_config(self.model, as_json=True)["config"]
        params = {k: v.get("string_value", v.get("stringValue", "")) for k, v in config.get("parameters", {}).items()}
        return ModelInfo.from_parameters(params, self.model)

    def describe(self) -> str:
        i = self.info
        return (f"Triton server {self.protocol}://{self.address}, model {self.model} "
                f"({i.backend} backend, {i.precision}, tile {i.tile}, tile batch {i.tile_batch})")

    def infer_array(self, array, *, layout: str = "HWC", overlap: int | None = None, color_fix: str | None = None):
        """uint8 numpy [n,H,W,3] (HWC) / [n,3,H,W] (CHW) -> the same layout x scale (numpy); the server
        applies ``color_fix`` (None: the model's default, ``info.color_fix``)."""
        tc = self._tc
        inp = tc.InferInput(IMAGE_IN, list(array.shape), "UINT8")
        inp.set_data_from_numpy(array)
        params = {"layout": layout}
        if overlap is not None:
            params["overlap"] = int(overlap)
        if color_fix is not None:
            params["color_fix"] = color_fix
        try:
            if self.protocol == "http":
                result = self._client.infer(self.model, [inp], parameters=params,
                                            outputs=[tc.InferRequestedOutput(IMAGE_OUT, binary_data=True)])
            else:
                result = self._client.infer(self.model, [inp], parameters=params, client_timeout=self.timeout_s)
        except self._error_types as exc:
            raise RemoteImageError(f"the server did not upscale this image: {_message(exc)}") from None
        return result.as_numpy(IMAGE_OUT)

    def upscale(self, image, *, overlap: int | None = None, color_fix: str | None = None):
        """uint8 torch [3,H,W] -> uint8 torch [3,H*scale,W*scale]: what upscale_tiled and then
        apply_color_fix(color_fix) return locally."""
        import numpy as np
        import torch

        array = np.ascontiguousarray(image.numpy())[None]
        out = self.infer_array(array, layout="CHW", overlap=overlap, color_fix=color_fix)
        return torch.from_numpy(np.array(out[0], copy=True))

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # closing a dead connection must not mask the run's result
            pass


def _message(exc: Exception) -> str:
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return (text or type(exc).__name__).strip()


# ---------------------------------------------------------------- dfosd-trt-run --server


class _RemoteBackend:
    """Stands in for ``runner.backend`` in dfosd-trt-run's report."""

    def __init__(self, text: str):
        self._text = text

    def describe(self) -> str:
        return self._text


class RemoteRunner:
    """What dfosd-trt-run needs of a runner (tile, batch, scale, precision, backend), served remotely."""

    def __init__(self, client: UpscaleClient):
        self.client = client
        info = client.info
        self.tile, self.batch, self.scale, self.precision = info.tile, info.tile_batch, info.scale, info.precision
        self.backend = _RemoteBackend(client.describe())

    def upscale(self, rgb, *, overlap: int | None = None, color_fix: str | None = None):
        return self.client.upscale(rgb, overlap=overlap, color_fix=color_fix)


def remote_runner(url: str, say=lambda m: None) -> RemoteRunner:
    client = UpscaleClient(url)
    say(f"upscaling on {client.describe()}")
    return RemoteRunner(client)


def local_only_options(ctx, names: tuple[str, ...]) -> None:
    """Refuse options that only mean something for local engines when they were given with --server."""
    import click

    given = []
    for param in ctx.command.params:
        if param.name in names:
            source = ctx.get_parameter_source(param.name)
            if source is not None and source not in (click.core.ParameterSource.DEFAULT,):
                given.append(param.opts[0])
    if given:
        raise DfosdError(f"{', '.join(given)} configure local engines and do not apply with --server",
                         hint="the server's engines, backend and tile batch are set where it runs (dfosd-serve)")
