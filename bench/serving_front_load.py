"""Load through dfosd-serve's front vs straight to its tritonserver, interleaved.

    python -m dfosd.bench.serving_front_load --front http://127.0.0.1:8000 --direct http://127.0.0.1:PORT \
        [--sizes 32x32,64x64] [--clients 8] [--seconds 60] [--rounds 2] [--out front-vs-direct]

``--direct`` is the tritonserver of the same dfosd-serve (its internal HTTP port, on 127.0.0.1:
``--http-port=`` in tritonserver's command line), so both paths share one model, one machine and
one moment: the rounds alternate front, direct, front, direct per size. Each level is
``dfosd.serving.loadgen``'s (clients back to back, one image per request, a warm-up first).
Writes ``OUT.json`` (every level, machine named) and ``OUT.md`` (medians over the rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path


def main(argv=None) -> None:
    from dfosd.serving.loadgen import cpu_description, measure

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--front", required=True)
    ap.add_argument("--direct", required=True)
    ap.add_argument("--sizes", default="32x32,64x64")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="front-vs-direct")
    ap.add_argument("--note", action="append", default=[])
    a = ap.parse_args(argv)
    runs = []
    for size in [tuple(int(v) for v in item.split("x"))[::-1] for item in a.sizes.split(",")]:  # WxH -> (h, w)
        for k in range(a.rounds):
            for path, url in (("front", a.front), ("direct", a.direct)):
                r = measure(url, sizes=[size], concurrency=[a.clients], seconds=a.seconds, warmup=a.warmup,
                            stats_url=a.direct)[0]
                runs.append({"path": path, "round": k, "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                             **asdict(r)})
                print(json.dumps(runs[-1]), flush=True)
    meta = {"machine": cpu_description(), "clients": a.clients, "seconds": a.seconds, "warmup": a.warmup,
            "rounds": a.rounds, "notes": a.note}
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    lines = [f"Machine: {meta['machine']}; {a.clients} clients x {a.seconds:g} s per run, HTTP, one image per "
             f"request; medians over {a.rounds} interleaved rounds (min-max in brackets).", "",
             "| LR size | path | images/s | median ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    for size in sorted({r["size"] for r in runs}, key=lambda s: int(s.split("x")[0])):
        for path in ("direct", "front"):
            rs = [r for r in runs if r["size"] == size and r["path"] == path]

            def cell(key, rs=rs):
                v = [r[key] for r in rs]
                return f"{statistics.median(v):g} ({min(v):g}-{max(v):g})"

            lines.append(f"| {size} | {'tritonserver directly (before)' if path == 'direct' else 'dfosd-serve front'} "
                         f"| {cell('requests_per_s')} | {cell('latency_ms_median')} | {cell('latency_ms_p99')} "
                         f"| {sum(r['failed'] for r in rs)} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # pragma: no cover
    main()
