"""Cost of one part across exports, interleaved: e.g. PiSA-SR's two-pass UNet against its merged one.

    python -m dfosd.bench.part_cost EXPORT_A EXPORT_B [--part unet] [--repeats 20] [--json out.json]

Each export's ``<part>_b<batch>.onnx`` runs in ONNX Runtime (CPU) on the same random input, in
interleaved rounds (bench.measure.time_interleaved) so machine noise hits both alike. Prints
medians and the ratio to the first.
"""

from __future__ import annotations

from pathlib import Path

import click

from dfosd.core.cli_support import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("exports", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--part", default="unet", show_default=True)
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=3))
@click.option("--threads", default=1, show_default=True, type=int, help="ONNX Runtime intra-op threads.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False))
@user_errors
def main(exports, part, batch, repeats, threads, json_path):
    import numpy as np
    import onnxruntime as ort

    from dfosd.bench.measure import time_interleaved
    from dfosd.core.manifest import ExportDir, write_json_atomic
    from dfosd.engines.machine import cpu_model

    sessions, feeds = [], []
    for d in exports:
        exp = ExportDir(d)
        entry = exp.entries(batch)[part]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(exp.file(entry["onnx"])), opts, providers=["CPUExecutionProvider"])
        feed = {}
        for i in sess.get_inputs():
            shape = [int(s) for s in i.shape]
            rng = np.random.default_rng(0)
            feed[i.name] = (rng.integers(0, 256, shape).astype(np.uint8) if "uint8" in i.type
                            else rng.standard_normal(shape).astype(np.float32))
        sessions.append(sess)
        feeds.append(feed)
    # one warm-up, then rounds with the order rotated (bench.measure): noise hits every export alike
    timings = time_interleaved({str(k): (lambda s=sess, f=feed: s.run(None, f))
                                for k, (sess, feed) in enumerate(zip(sessions, feeds))},
                               warmup=1, repeats=repeats, sync=lambda: None)
    times = [timings[str(k)].runs_ms for k in range(len(exports))]
    med = [timings[str(k)].median_ms for k in range(len(exports))]
    rows = [{"export": str(Path(d).resolve()), "median_ms": round(m, 3), "ratio": round(m / med[0], 3),
             "runs_ms": [round(x, 3) for x in t]} for d, m, t in zip(exports, med, times)]
    for r in rows:
        click.echo(f"{r['export']}: {part} median {r['median_ms']:.2f} ms ({r['ratio']:.2f}x the first)")
    if json_path:
        write_json_atomic(Path(json_path), {"part": part, "batch": batch, "repeats": repeats, "threads": threads,
                                            "machine": cpu_model(), "rows": rows})


if __name__ == "__main__":  # pragma: no cover
    main()
