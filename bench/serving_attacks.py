"""Hostile requests against a running dfosd-serve: status codes, survival, memory.

    python -m dfosd.bench.serving_attacks --url 127.0.0.1:8000 --serve-pid PID [--out attacks.json]

Each attack, sent to the HTTP address given: a 300 KB body of nested brackets
(crashed tritonserver 2.51 with SIGSEGV when it faced the network), ``POST /v2/logging``
without the admin key, a 300 MB binary body (sent in full), the same four and 32 at once,
a JSON body of 300 MB, and a gzip bomb (1 GiB of zeros in 1 MB) four at once. While they run, the resident memory of
dfosd-serve (its front runs in that process) and of tritonserver with its backend stubs
(the children of dfosd-serve) is sampled every 20 ms; the result records each attack's
answers, the peaks and what is left after, and whether tritonserver kept its pid.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import zlib
from pathlib import Path

BIG = 300 * 1000 * 1000


def _children(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Sampler:
    """Peak RSS of dfosd-serve itself and of tritonserver + its stubs, sampled in a thread."""

    def __init__(self, serve_pid: int):
        self.serve_pid = serve_pid
        self._triton: list[int] = []  # looked up once per attack: a scan of /proc is not cheap
        self.peak = {"dfosd-serve": 0.0, "tritonserver": 0.0}
        self._stop = threading.Event()

    def triton_pids(self) -> list[int]:
        return [p for p in _children(self.serve_pid) if _comm(p) not in ("python3", "python")]

    def now(self, triton: list[int] | None = None) -> dict[str, float]:
        return {"dfosd-serve": rss_mb([self.serve_pid]), "tritonserver": rss_mb(triton or self.triton_pids())}

    def __enter__(self):
        self._triton = self.triton_pids()
        self.peak = self.now(self._triton)

        def loop():
            while not self._stop.is_set():
                for k, v in self.now(self._triton).items():
                    self.peak[k] = max(self.peak[k], v)
                time.sleep(0.02)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def send(address: str, path: str, body_len: int, headers: dict, head: bytes = b"", fill: bytes = b"\0") -> tuple:
    """POST ``head`` then zero bytes up to ``body_len`` (streamed); (status, first 160 chars) or the error."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.putrequest("POST", path)
        for k, v in {**headers, "Content-Length": str(body_len)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(head)
        left, chunk = body_len - len(head), fill * (1 << 20)
        try:
            while left > 0:
                conn.send(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        except OSError:
            pass  # the server answered early and closed: read its answer
        r = conn.getresponse()
        return r.status, r.read()[:160].decode(errors="replace")
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def _binary_header(shape, declared: int) -> bytes:
    return json.dumps({"inputs": [{"name": "lr_image", "shape": shape, "datatype": "UINT8",
                                   "parameters": {"binary_data_size": declared}}]}).encode()


def attacks(model: str = "dfosd", many: int = 32, big: int = BIG, bomb_mib: int = 1024) -> dict:
    infer = f"/v2/models/{model}/infer"
    nested = b"[" * 150000 + b"]" * 150000
    big_head = _binary_header([1, 10000, 10000, 3], big)
    small_claim = _binary_header([1, 16, 16, 3], 16 * 16 * 3)
    json_h = {"Content-Type": "application/json"}
    co = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    bomb = b"".join(co.compress(bytes(1 << 20)) for _ in range(bomb_mib)) + co.flush()
    bin_h = lambda h: {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(h))}
    binary = (infer, len(big_head) + big, bin_h(big_head), big_head, b"\0")
    return {
        "nested JSON, 300 KB": [(infer, len(nested), json_h, nested, b"")],
        f"nested JSON x {2 * many} at once": [(infer, len(nested), json_h, nested, b"")] * (2 * many),
        "POST /v2/logging log_verbose_level 9": [("/v2/logging", 26, json_h, b'{"log_verbose_level": 9}  ', b"")],
        "big binary body (10000x10000 declared)": [binary],
        "big body behind a 16x16 header": [(infer, len(small_claim) + big, bin_h(small_claim), small_claim, b"\0")],
        "big binary body x 4 at once": [binary] * 4,
        f"big binary body x {many} at once": [binary] * many,
        "big JSON body": [(infer, big, json_h, b'{"inputs": [', b" ")],
        f"gzip bomb ({bomb_mib} MiB of zeros in {len(bomb) >> 10} KiB) x 4 at once": [(infer, len(bomb), {**json_h, "Content-Encoding": "gzip"},
                                                            bomb, b"")] * 4,
    }


def measure(address: str, serve_pid: int, model: str = "dfosd", many: int = 32, big: int = BIG,
            bomb_mib: int = 1024) -> dict:
    sampler = Sampler(serve_pid)
    triton_before = sampler.triton_pids()
    result = {"big_body_bytes": big, "before_mb": sampler.now(), "attacks": {}}
    for name, requests in attacks(model, many, big, bomb_mib).items():
        answers = [None] * len(requests)

        def one(i, req):
            path, length, headers, head, fill = req
            answers[i] = send(address, path, length, headers, head, fill)

        t0 = time.monotonic()
        with sampler:
            threads = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(requests)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        time.sleep(0.2)
        result["attacks"][name] = {
            "answers": sorted({f"{s}: {text}" for s, text in answers}), "seconds": round(time.monotonic() - t0, 2),
            "peak_mb": {k: round(v, 1) for k, v in sampler.peak.items()},
            "after_mb": {k: round(v, 1) for k, v in sampler.now().items()}}
    result["tritonserver_kept_its_pid"] = sorted(sampler.triton_pids()) == sorted(triton_before)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="HOST:PORT of dfosd-serve's HTTP front")
    ap.add_argument("--serve-pid", type=int, required=True, help="pid of dfosd-serve")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = measure(args.url.split("://")[-1], args.serve_pid)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
