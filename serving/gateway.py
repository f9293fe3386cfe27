"""dfosd-serve's front: the one HTTP port the network sees, in front of a loopback-bound tritonserver.

Why a front of our own (measured on tritonserver 2.51 from nvidia-pytriton 0.7.0, see README
"Serving on a network"): Triton's HTTP frontend parses a request's JSON before any model or
limit sees it, and a 300 KB body of nested brackets crashes it (SIGSEGV); it buffers a binary
body whole before the model's --max-pixels check (300 MB -> +565 MB that stays); and anyone who
reaches it may change its log level. ``--http-restricted-api`` closes the management endpoints
but neither of the others. So tritonserver listens on 127.0.0.1 only (HTTP, gRPC, metrics) and
this front, an aiohttp server in dfosd-serve's own process, forwards what it has checked:

- only the endpoints a client needs: health, metadata, config, statistics, and inference of
  the served model; the management endpoints (logging, repository, trace, shared memory) need
  the ``dfosd-admin-key`` header of ``--admin-key`` (without it they are closed, and Triton
  itself also refuses them: it gets the key, or a random one, through its restricted-API flags);
- an inference request is checked before its pixels are read: Content-Length given, no
  Content-Encoding (a compressed body would inflate inside Triton), a JSON header of at most
  ``header_bytes`` nested at most ``json_depth`` deep, one uint8 ``lr_image`` whose shape,
  batch and pixel count the model accepts, a body exactly as long as that shape says; the
  binary pixels are then streamed to Triton, never held here whole;
- memory is bounded by design: at most ``max_requests`` requests are handled at once (more get
  503 at once), each holding at most its JSON header here; the bytes that requests in flight may
  make Triton hold (input + output) are limited to ``inflight_bytes`` (a request waits for room,
  up to its timeout). A request whose body stalls for ``body_timeout_s`` is dropped.

Every refusal is a 4xx (5xx only for a server that is down) with ``{"error": reason}``, the
form tritonclient reads. ``GET /`` serves the page in ``serving/web`` (``--no-ui`` leaves it out);
``GET /progress/<id>`` the tiles done of a request in flight that carries that KServe id
(``serving/progress``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from pathlib import Path

from dfosd.core.errors import DfosdError
from dfosd.serving.progress import read_progress
from dfosd.serving.request_checks import GatewayLimits, Refused, check_infer_header, parse_json

log = logging.getLogger(__name__)

ADMIN_HEADER = "dfosd-admin-key"
ADMIN_APIS = "logging,model-repository,trace,shared-memory"  # Triton's restricted-API names
ADMIN_PREFIXES = ("/v2/logging", "/v2/repository", "/v2/trace", "/v2/systemsharedmemory", "/v2/cudasharedmemory")
WEB_DIR = Path(__file__).with_name("web")
WEB_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
             "/style.css": ("style.css", "text/css")}
CHUNK = 1 << 18


class _Budget:
    """Bytes that requests in flight may make Triton hold; a request waits until its share fits."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._cond = asyncio.Condition()

    async def take(self, n: int, timeout: float) -> int:
        n = min(n, self.total)  # one request alone always fits (the limits allow it)
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.total), timeout)
            self.used += n
        return n

    async def give(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class Gateway:
    """The aiohttp front on ``host:port`` forwarding to ``upstream`` (http://127.0.0.1:PORT); own thread."""

    def __init__(self, limits: GatewayLimits, upstream: str, host: str, port: int, ui: bool = True,
                 progress_dir=lambda: None):
        self.limits, self.upstream, self.host, self.port, self.ui = limits, upstream.rstrip("/"), host, port, ui
        self.progress_dir = progress_dir  # () -> the folder the model reports progress in (serving/progress.py)
        # the page's few small files, read once: not from disk on every request
        self.pages = {path: ((WEB_DIR / name).read_bytes(), kind)
                      for path, (name, kind) in WEB_FILES.items()} if ui else {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._active = 0
        self.stats = {"forwarded": 0, "refused": 0}

    # -- life

    def start(self) -> "Gateway":
        ready, failure = threading.Event(), []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.run_until_complete(self._session.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="dfosd-gateway", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise DfosdError(f"cannot listen on {self.host}:{self.port} ({failure[0]})",
                             hint="choose another --http-port, or stop what uses it")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._thread = None

    async def _serve(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._budget = _Budget(self.limits.inflight_bytes)
        # force_close: no idle keep-alive connection to tritonserver, which would hold up its shutdown
        # (--exit-timeout) for nothing; a loopback connect per request costs well under a millisecond.
        self._session = ClientSession(connector=TCPConnector(limit=self.limits.max_requests, force_close=True),
                                      timeout=ClientTimeout(total=self.limits.request_timeout_s),
                                      auto_decompress=False)
        app = web.Application(client_max_size=self.limits.header_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    # -- requests

    async def _handle(self, request):
        from aiohttp import web

        if self._active >= self.limits.max_requests:
            self.stats["refused"] += 1
            return _error(503, f"busy: {self.limits.max_requests} requests in progress; try again")
        self._active += 1
        try:
            return await self._route(request)
        except Refused as r:
            self.stats["refused"] += 1
            return _error(r.status, r.reason)
        except asyncio.TimeoutError:
            return _error(408, "the request took too long (its body stalled, or no room for it in time)")
        except asyncio.IncompleteReadError:
            return _error(400, "the body ended before its Content-Length")
        except web.HTTPException:
            raise
        except OSError as exc:
            return _error(503, f"the model server is not reachable ({exc}); it may be restarting")
        except Exception as exc:  # noqa: BLE001 - a bug here answers this request and the front goes on
            log.exception("dfosd-serve front: %s %s failed", request.method, request.path)
            return _error(500, f"internal error in dfosd-serve's front: {type(exc).__name__}: {exc}")
        finally:
            self._active -= 1

    async def _route(self, request):
        from aiohttp import web

        path, method = request.path, request.method
        if path in self.pages and method == "GET":
            return _page(*self.pages[path])
        if path.startswith("/progress/") and method == "GET":  # a request's tiles, for the page
            state = read_progress(self.progress_dir(), path[len("/progress/"):])
            if state is None:
                raise Refused(404, "no request with that id is in progress")
            return web.json_response(state, headers={"Cache-Control": "no-store"})
        if path.startswith(ADMIN_PREFIXES) or (path.startswith("/v2/models/") and path.endswith("/trace/setting")):
            return await self._admin(request)
        model_path = f"/v2/models/{self.limits.model}"
        if method == "POST" and path in (f"{model_path}/infer", f"{model_path}/versions/1/infer"):
            return await self._infer(request)
        readable = ("/v2", "/v2/health/live", "/v2/health/ready", model_path, f"{model_path}/ready",
                    f"{model_path}/config", f"{model_path}/stats", f"{model_path}/versions/1",
                    f"{model_path}/versions/1/ready")
        if method in ("GET", "HEAD") and path in readable:
            return await self._forward(request, b"")
        raise Refused(404, f"{method} {path} is not served here (inference: POST {model_path}/infer)")

    async def _admin(self, request):
        key = self.limits.admin_key
        if key is None:
            raise Refused(403, "management endpoints are closed: start dfosd-serve with --admin-key to open them")
        if not hmac.compare_digest(request.headers.get(ADMIN_HEADER, "").encode(), key.encode()):
            raise Refused(403, f"management endpoints need the {ADMIN_HEADER} header of --admin-key")
        body = await self._small_body(request)
        if body:
            parse_json(body, self.limits.json_depth)
        return await self._forward(request, body, {ADMIN_HEADER: key})

    async def _small_body(self, request) -> bytes:
        length = _content_length(request)
        if length > self.limits.header_bytes:
            raise Refused(413, f"body of {length} bytes; at most {self.limits.header_bytes} here")
        if length == 0:
            return b""
        return await asyncio.wait_for(request.content.readexactly(length), self.limits.body_timeout_s)

    async def _infer(self, request):
        lim = self.limits
        length = _content_length(request)
        hlen_text = request.headers.get("Inference-Header-Content-Length")
        if hlen_text is None:  # the pixels are JSON numbers: the whole body is parsed here
            if length > lim.json_body_bytes:
                raise Refused(413, f"a JSON request of {length} bytes; at most {lim.json_body_bytes} (send the "
                                   "pixels as binary data: tritonclient does, with binary_data=True)")
            taken = await self._budget.take(length + lim.max_batch * lim.max_pixels * 3 * lim.scale ** 2,
                                            lim.request_timeout_s)
            try:
                body = await asyncio.wait_for(request.content.readexactly(length), lim.body_timeout_s)
                head = await asyncio.to_thread(parse_json, body, lim.json_depth)
                check_infer_header(head, lim, binary=False)
                return await self._forward(request, body)
            finally:
                await self._budget.give(taken)
        try:
            hlen = int(hlen_text)
        except ValueError:
            raise Refused(400, f"Inference-Header-Content-Length {hlen_text!r} is not a number") from None
        if not 0 < hlen <= min(length, lim.header_bytes):
            raise Refused(400 if hlen <= lim.header_bytes else 413,
                          f"Inference-Header-Content-Length {hlen}: must be 1..{lim.header_bytes} and within the body")
        head_bytes = await asyncio.wait_for(request.content.readexactly(hlen), lim.body_timeout_s)
        pixels, out_bytes = check_infer_header(parse_json(head_bytes, lim.json_depth), lim, binary=True)
        if length != hlen + pixels:  # the header's shape passed the limits: so does an equal length
            raise Refused(413 if length > hlen + pixels else 400,
                          f"body of {length} bytes; the header says {hlen} + {pixels} (header + pixels)")
        taken = await self._budget.take(length + out_bytes, lim.request_timeout_s)
        try:
            return await self._forward(request, _stream(head_bytes, request, pixels, lim.body_timeout_s))
        finally:
            await self._budget.give(taken)

    async def _forward(self, request, body, extra_headers: dict | None = None):
        from aiohttp import web

        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("content-type", "inference-header-content-length", "content-length")}
        headers["Accept-Encoding"] = "identity"  # aiohttp would ask for gzip; bodies pass through as they are
        headers.update(extra_headers or {})
        url = self.upstream + request.path + (f"?{request.query_string}" if request.query_string else "")
        async with self._session.request(request.method, url, data=body, headers=headers) as up:
            self.stats["forwarded"] += 1
            out = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items()
                if k.lower() in ("content-type", "inference-header-content-length", "content-length")})
            await out.prepare(request)
            async for chunk in up.content.iter_chunked(CHUNK):
                await out.write(chunk)
            await out.write_eof()
            return out


async def _stream(head: bytes, request, n: int, timeout: float):
    """The checked header, then exactly ``n`` body bytes as they arrive (never all held here)."""
    yield head
    left = n
    while left:
        chunk = await asyncio.wait_for(request.content.read(min(CHUNK, left)), timeout)
        if not chunk:
            raise Refused(400, "the body ended early")
        left -= len(chunk)
        yield chunk


def _content_length(request) -> int:
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise Refused(415, "compressed request bodies are not accepted (Content-Encoding)")
    if request.content_length is None:
        if request.method in ("GET", "HEAD"):
            return 0
        raise Refused(411, "Content-Length is required (chunked bodies are not accepted)")
    return request.content_length


def _error(status: int, reason: str):
    from aiohttp import web

    return web.json_response({"error": reason}, status=status)


def _page(body: bytes, kind: str):
    from aiohttp import web

    return web.Response(body=body, content_type=kind,
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def front_for(opts, server) -> Gateway:
    """dfosd-serve's front for ``opts`` (serve.ServeOptions) before ``server`` (serve.TritonServer), with the
    model's limits; it outlives tritonserver's restarts (503 meanwhile). Not started."""
    from dfosd.core.manifest import ExportDir
    from dfosd.serving.triton_repo import DEFAULT_MAX_PIXELS

    limits = GatewayLimits(model=opts.model_name, max_pixels=opts.max_pixels or DEFAULT_MAX_PIXELS,
                           max_batch=opts.max_batch, scale=ExportDir(opts.export_dir, check="none").upscale,
                           admin_key=opts.admin_key, request_timeout_s=opts.request_timeout_s + 60)
    return Gateway(limits, server.http_url, opts.host, opts.http_port, ui=opts.ui,
                   progress_dir=lambda: server.progress_dir)
