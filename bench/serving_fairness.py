"""A small request's latency while a maximal one runs on a dfosd-serve server.

    python -m dfosd.bench.serving_fairness --url localhost:8000 [--big 1024] [--out fairness.json]

Sends five 16x16 requests on an idle server, then one --big x --big request (the default
--max-pixels: 1024x1024) and, 3 s later, 16x16 requests one after the other (up to ten) while
it runs. Prints and writes the latencies as JSON. Needs tritonclient[http].
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


def _infer(url: str, array):
    import tritonclient.http as th

    client = th.InferenceServerClient(url, connection_timeout=3600, network_timeout=3600)
    x = th.InferInput("lr_image", list(array.shape), "UINT8")
    x.set_data_from_numpy(array)
    t0 = time.monotonic()
    out = client.infer("dfosd", [x], outputs=[th.InferRequestedOutput("sr_image", binary_data=True)])
    seconds = time.monotonic() - t0
    client.close()
    return seconds, list(out.as_numpy("sr_image").shape)


def measure(url: str, big_side: int = 1024, delay_s: float = 3.0) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (1, big_side, big_side, 3), dtype=np.uint8)
    idle = [_infer(url, small)[0] for _ in range(5)]
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("big", _infer(url, big)))
    worker.start()
    time.sleep(delay_s)
    during = []
    while worker.is_alive() and len(during) < 10:
        during.append(_infer(url, small)[0])
        time.sleep(0.5)
    worker.join()
    return {"url": url, "big_side": big_side, "small_side": 16, "idle_small_s": idle,
            "small_while_big_runs_s": during, "big_s": result["big"][0], "big_output_shape": result["big"][1],
            "idle_small_median_s": statistics.median(idle),
            "small_while_big_median_s": statistics.median(during) if during else None,
            "small_while_big_max_s": max(during) if during else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="localhost:8000", help="HOST:PORT of the server's HTTP endpoint")
    p.add_argument("--big", type=int, default=1024, help="side of the big request (LR pixels)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    text = json.dumps(measure(args.url, args.big), indent=1)
    print(text)
    if args.out:
        from pathlib import Path

        from dfosd.core.manifest import write_text_atomic

        write_text_atomic(Path(args.out), text + "\n")


if __name__ == "__main__":  # pragma: no cover
    main()
