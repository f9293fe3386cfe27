"""The GPU bench's command line, results and contracts-only exports, cheaply on the CPU.

The GPU rows themselves need the device machine (bench/gpu_session.sh); here the eager
row runs on the tiny model (the bench's measuring, results file, report and plot are the
same code), and the contracts-only export goes through export_checkpoint's seam (a base
already in memory, a part exporter) instead of patching export internals.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import TILE, TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_contracts_only_export_writes_a_real_manifest_and_leaves_the_base_alone(tiny_base, tiny_ckpt, tmp_path):
    import torch

    from dfosd.bench.gpu_harness import PLACEHOLDER, contracts_only_export
    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.export.artifacts import ExportConfig

    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    res = contracts_only_export(tiny_ckpt, tiny_base, tmp_path / "x", ExportConfig(precision="fp32", tile=TILE),
                                progress=lambda m: None)
    after = tiny_base.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the LoRA went into a copy
    geo = Geometry(tile=TILE, batch=1, upscale=4, vae_scale_factor=tiny_base.vae_scale_factor,
                   latent_channels=tiny_base.latent_channels)
    expected = {c.stem: c.to_dict() for c in component_contracts(geo).values()}
    comps = res.manifest["components"]
    assert {stem: c["contract"] for stem, c in comps.items()} == expected
    assert all(c["placeholder"] and (tmp_path / "x" / c["onnx"]).read_bytes() == PLACEHOLDER for c in comps.values())
    again = contracts_only_export(tiny_ckpt, tiny_base, tmp_path / "x", ExportConfig(precision="fp32", tile=TILE),
                                  progress=lambda m: None)
    assert again.reused

    from dfosd.bench.verify import main as verify

    r = CliRunner().invoke(verify, [str(tmp_path / "x")])
    assert r.exit_code == 2 and "contracts-only" in r.output


def test_gpu_bench_eager_rows_results_and_merge(tiny_ckpt, tmp_path):
    from dfosd.bench.gpu_bench import main

    work = tmp_path / "work"
    args = ["--base", TINY, "--ckpt", str(tiny_ckpt), "--tile", str(TILE), "--batches", "1", "--rows", "eager",
            "--warmup", "0", "--repeats", "2", "--component-repeats", "1", "--work", str(work)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = work / "results"
    result = json.loads((out / "gpu_bench.json").read_text())
    row = result["rows"]["eager-fp32/b1"]
    assert len(row["runs_ms"]) == 2 and row["median_ms"] > 0 and row["psnr_db"] == "inf"  # the reference itself
    assert row["output"] == f"1x{4 * TILE}x{4 * TILE}" and result["config"]["base"] == TINY
    assert "no CUDA GPU" in result["rows"]["eager-fp16"]["skipped"]
    md = (out / "gpu_bench.md").read_text()
    assert "| eager PyTorch fp32 |" in md and "eager-fp16: no CUDA GPU" in md
    assert (out / "gpu_bench.png").read_bytes()[:4] == b"\x89PNG"
    # a second machine's results (here: the same file with a renamed row) merge by row id
    other = dict(result, rows={"eager-fp32/b1-other": dict(row, id="eager-fp32/b1-other")})
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = CliRunner().invoke(main, ["--merge", str(out / "gpu_bench.json"), str(tmp_path / "other.json"),
                                  "--out", str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = json.loads((tmp_path / "merged" / "gpu_bench.json").read_text())
    assert {"eager-fp32/b1", "eager-fp32/b1-other", "eager-fp16"} == set(merged["rows"])
    r = CliRunner().invoke(main, [str(tmp_path / "other.json")])
    assert r.exit_code == 2 and "--merge" in r.output


def test_gpu_bench_bad_options_are_user_errors(tmp_path):
    from dfosd.bench.gpu_bench import main

    r = CliRunner().invoke(main, ["--rows", "eager,warp", "--work", str(tmp_path)])
    assert r.exit_code == 1 and "--rows warp" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--batches", "1,x", "--work", str(tmp_path)])
    assert r.exit_code == 2 and "--batches" in r.output


def test_results_of_another_run_are_kept_aside_not_replaced(tmp_path):
    import json

    from dfosd.bench.gpu_report import load_results

    path = tmp_path / "gpu_bench.json"
    earlier = {"config": {"base": "other", "tile": 64}, "machine": {"gpu": "A100"}, "rows": {"eager-fp32/b1": {}}}
    path.write_text(json.dumps(earlier))
    said = []
    fresh = load_results(path, {"base": "synthetic:sd21-base", "tile": 128}, {"gpu": "H200"}, said.append)
    assert fresh["rows"] == {} and not path.exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("gpu_bench.")]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == earlier and str(kept[0]) in said[0]
    path.write_text("not json{")  # unreadable: kept too, under a name of its own
    load_results(path, {"base": "synthetic:sd21-base", "tile": 128}, {"gpu": "H200"}, said.append)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("gpu_bench.")]) == 2
