"""INT8/FP8 calibration and Q/DQ export on the tiny base, calibrated with real photographs.

Calibration photos (astronaut, coffee, chelsea) and held-out photos (rocket,
immunohistochemistry) come from scikit-image, reduced 4x to LR size and written as PNG
files, the way a user would point --calib-data at a folder.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import CALIB_COUNT, CALIB_PHOTOS, TILE, TINY, export_8bit, write_photos

HELD_OUT_PHOTOS = ("rocket", "immunohistochemistry")
# Never quantized (the recipe's exclusions), as ONNX node-name fragments.
EXCLUDED_NODES = ("/conv_in/", "/conv_out/", "/conv_shortcut/", "/proj_out/", "/time_emb", "/attn2/to_k/",
                  "/attn2/to_v/")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def held_out_dir(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("held_out") / "photos", HELD_OUT_PHOTOS)


def _manifest(export_dir):
    return json.loads((export_dir / "manifest.json").read_text())


# --- calibration data -------------------------------------------------------------------


def test_tiles_are_deterministic_crops_from_every_photo(calib_dir):
    from PIL import Image

    from dfosd.calibration.data import load_tiles

    a, b = load_tiles(calib_dir, TILE, CALIB_COUNT), load_tiles(calib_dir, TILE, CALIB_COUNT)
    assert a.tiles.shape == (CALIB_COUNT, 3, TILE, TILE) and str(a.tiles.dtype) == "torch.uint8"
    assert bool((a.tiles == b.tiles).all()) and a.sha256 == b.sha256
    assert a.files == tuple(f"{n}.png" for n in sorted(CALIB_PHOTOS)) and a.files_used == 3
    # round-robin: the first tile is a grid-aligned crop of the first photo
    photo = np.asarray(Image.open(calib_dir / a.files[0]).convert("RGB"))
    first = a.tiles[0].permute(1, 2, 0).numpy()
    crops = [photo[y:y + TILE, x:x + TILE] for y in range(0, photo.shape[0] - TILE + 1, TILE)
             for x in range(0, photo.shape[1] - TILE + 1, TILE)]
    assert any(np.array_equal(first, c) for c in crops)
    everything = load_tiles(calib_dir, TILE, 10_000)
    assert everything.tiles.shape[0] == 16 + 12 + 6  # 128x128, 100x150 and 75x112 photos


def test_file_list_hash_follows_contents_not_location(calib_dir, tmp_path):
    from PIL import Image

    from dfosd.calibration.data import file_list_sha256

    copy = shutil.copytree(calib_dir, tmp_path / "copy")
    assert file_list_sha256(copy) == file_list_sha256(calib_dir)
    img = np.asarray(Image.open(copy / "coffee.png")).copy()
    img[0, 0] ^= 1
    Image.fromarray(img).save(copy / "coffee.png")
    assert file_list_sha256(copy) != file_list_sha256(calib_dir)


def test_unusable_calibration_folders_are_user_errors(tmp_path):
    from PIL import Image

    from dfosd.calibration.data import load_tiles
    from dfosd.core.errors import DfosdError

    with pytest.raises(DfosdError, match="does not exist"):
        load_tiles(tmp_path / "missing", TILE, 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfosdError, match="holds no images"):
        load_tiles(tmp_path / "empty", TILE, 4)
    (tmp_path / "small").mkdir()
    Image.new("RGB", (TILE - 1, 200)).save(tmp_path / "small" / "thin.png")
    with pytest.raises(DfosdError, match=f"at least {TILE}x{TILE}"):
        load_tiles(tmp_path / "small", TILE, 4)


# --- configuration ----------------------------------------------------------------------


def test_export_config_for_8bit(calib_dir):
    from dfosd.core.errors import DfosdError
    from dfosd.export.artifacts import ExportConfig

    from dfosd.calibration.recipe import QuantRecipe

    opts = ExportConfig.from_options
    cfg = opts(precision="int8", calib_data=str(calib_dir), quantize="vae-dec,unet")
    assert cfg.quantize == ("unet", "decoder") and cfg.float_precision == "fp16" and cfg.opset == 19
    assert cfg.component_precision("unet") == "int8" and cfg.component_precision("encoder") == "fp16"
    assert cfg.quant == QuantRecipe(precision="int8", calib_data=str(calib_dir), components=("unet", "decoder"))
    assert opts(precision="int8", float_precision="fp32", calib_data=str(calib_dir)).opset == 17
    assert opts(precision="fp8", float_precision="fp32", calib_data=str(calib_dir)).opset == 19
    plain = ExportConfig(precision="fp16")  # float exports keep their meaning
    assert (plain.opset, plain.quantize, plain.float_precision, plain.quant) == (17, (), "fp16", None)
    with pytest.raises(DfosdError, match="needs --calib-data"):
        opts(precision="int8")
    with pytest.raises(DfosdError, match="needs --calib-data"):
        ExportConfig(precision="int8")
    # fp16: the photos of the range pass that picks the fp32 islands
    assert opts(precision="fp16", calib_data=str(calib_dir)).range_photos == str(calib_dir)
    with pytest.raises(DfosdError, match="fp16 \\(its range pass\\) and int8/fp8 only"):
        opts(precision="fp32", calib_data=str(calib_dir))
    with pytest.raises(DfosdError, match="apply to --precision int8/fp8"):
        ExportConfig(precision="fp16", quant=QuantRecipe(calib_data=str(calib_dir)))
    with pytest.raises(DfosdError, match="with a fp8 recipe"):
        ExportConfig(precision="int8", quant=QuantRecipe(precision="fp8", calib_data=str(calib_dir)))
    with pytest.raises(DfosdError, match="--quantize 'vae'"):
        opts(precision="int8", calib_data=str(calib_dir), quantize="unet,vae")
    with pytest.raises(DfosdError, match="choose 19..21"):
        opts(precision="fp8", calib_data=str(calib_dir), opset=17)


@pytest.mark.filterwarnings("ignore:2 is not calibrated")  # ModelOpt: the disabled Linear is not smoothed
def test_summary_check_fails_when_a_meant_class_has_no_enabled_quantizer():
    """ModelOpt configs can silently disable a layer class: that must stop the export."""
    import torch
    from torch import nn

    from dfosd.calibration.quantize import check_summary, modelopt, modelopt_config, quantizer_summary
    from dfosd.calibration.recipe import QuantRecipe
    from dfosd.core.errors import DfosdError

    mtq = modelopt()
    recipe = QuantRecipe(precision="int8", float_precision="fp32")
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8))

    good = mtq.quantize(net(), modelopt_config(recipe), lambda m: [m(x) for x in data])
    summary = quantizer_summary(good, recipe.exclude)
    assert (summary["Conv2d"]["enabled"], summary["Linear"]["enabled"]) == (2, 2)
    check_summary("toy", summary)

    cfg = modelopt_config(recipe)
    cfg["quant_cfg"].append({"quantizer_name": "*", "parent_class": "nn.Linear", "enable": False})
    bad = mtq.quantize(net(), cfg, lambda m: [m(x) for x in data])
    summary = quantizer_summary(bad, recipe.exclude)
    assert summary["Linear"]["meant_but_disabled"] == ["2"]
    with pytest.raises(DfosdError, match="every Linear quantizer disabled"):
        check_summary("toy", summary)


# --- INT8 export ------------------------------------------------------------------------


def test_int8_manifest_records_calibration(int8_export, calib_dir):
    from dfosd.calibration.data import file_list_sha256

    m = _manifest(int8_export)
    cal = m["calibration"]
    assert (cal["tiles"], cal["tile"], cal["files"], cal["files_used"]) == (CALIB_COUNT, TILE, 3, 3)
    assert cal["file_list_sha256"] == file_list_sha256(calib_dir) == m["inputs"]["calibration_sha256"]
    assert cal["components"] == ["encoder", "unet", "decoder"]
    recipe = cal["recipe"]
    assert recipe["algorithm"] == {"method": "smoothquant", "alpha": 0.8}
    assert (recipe["conv_calibration"], recipe["percentile"], recipe["weights"]) == (
        "percentile", 99.99, "per-channel (axis 0)")
    assert {"*conv_in*", "*conv_out*", "*conv_shortcut*", "*time_emb*", "*norm_out*", "*proj_out*"} <= set(
        recipe["exclude"])
    for part, summary in cal["quantizers"].items():
        for cls in ("Linear", "Conv2d"):
            assert summary[cls]["enabled"] > 0 and not summary[cls]["meant_but_disabled"], (part, cls)
    assert {c["component"]: c["precision"] for c in m["components"].values()} == {
        "encoder": "int8", "unet": "int8", "decoder": "int8"}
    assert m["inputs"]["software"]["nvidia-modelopt"]


def test_int8_onnx_has_per_channel_qdq_and_honours_exclusions(int8_export):
    import onnx

    for entry in _manifest(int8_export)["components"].values():
        qdq = entry["qdq"]
        assert qdq["quantize_linear"] > 0 and qdq["per_channel_dequantize"] > 0, entry["onnx"]
        assert qdq["zero_point_types"] == ["INT8"] and qdq["custom_ops"] == []
        model = onnx.load(str(int8_export / entry["onnx"]))
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == 17
        q_names = [n.name for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert [n for n in q_names if any(x in n for x in EXCLUDED_NODES)] == []
        # every quantized Conv reads a dequantized weight (what TensorRT fuses into INT8 kernels)
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert sum(producers.get(n.input[1]) == "DequantizeLinear" for n in convs) > 0
    # the cross-attention K/V of the fixed embedding stayed float and folded away
    unet = onnx.load(str(int8_export / "unet_b1.onnx"))
    assert not [n.name for n in unet.graph.node if "/attn2/to_k/" in n.name or "/attn2/to_v/" in n.name]


def _image(out):
    return out[0] if isinstance(out, tuple) else out


def _qdq_pairs_against_fake_quant(onnx_path, part, x):
    """Every Q/DQ pair of the ONNX file, run by ONNX Runtime, against the ModelOpt quantizer
    it came from, both fed the same tensor: the one ORT computed at that quantizer's input.

    End to end the two cannot be compared tightly: float-noise differences between the
    backends (a few ulp after a GroupNorm) flip a rounding decision now and then, and in
    these random-weight parts the flips cascade (measured: a 1e-6 relative nudge to torch's
    own conv_in output moves the encoder's output as far from fake-quant as ORT is). Per
    pair there is no cascade: the same input must give the same 8-bit grid, so a wrong scale
    or axis, a lost pre-quant (SmoothQuant) scale, or a lost or extra pair all show here.
    Returns {quantizer name: (elements, elements off by half a step or more, largest
    difference in steps)}; names present on one side only map to None.
    """
    import onnx
    import onnxruntime as ort
    import torch

    from dfosd.calibration.quantize import modelopt

    model = onnx.load(str(onnx_path))
    graph = model.graph
    constant = {i.name for i in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    pairs = {}  # quantizer module name -> (its input tensor or weight initializer, the DQ output)
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        scope = q.name.rsplit("/", 1)[0] + "/"
        inside = [n for n in graph.node if n.name.startswith(scope)]
        made_inside = {o for n in inside for o in n.output}
        # the tensor entering the quantizer's scope (read twice in some scopes); none for a weight
        entry = list(dict.fromkeys(i for n in inside for i in n.input
                                   if i and i not in made_inside and i not in constant))
        dq = [n for n in inside if n.op_type == "DequantizeLinear"]
        assert len(dq) == 1 and len(entry) <= 1, scope
        pairs[scope.strip("/").replace("/", ".")] = (entry[0] if entry else q.input[0], dq[0].output[0])
    known = {v.name for v in graph.output}
    for name in {t for pair in pairs.values() for t in pair} - known - {i.name for i in graph.initializer}:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no QLinear fusion
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ran = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))

    mtq = modelopt()
    modules = dict(part.named_modules())
    enabled = {n for n, m in modules.items() if isinstance(m, mtq.nn.TensorQuantizer) and m.is_enabled}
    out = {n: None for n in (enabled ^ set(pairs))}
    for name in enabled & set(pairs):
        quantizer, (entry, dq) = modules[name], pairs[name]
        if entry in ran:
            seen = torch.from_numpy(ran[entry])
        else:  # a weight: the quantizer's own layer holds it
            seen = getattr(modules[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1].replace("_quantizer", ""))
        with torch.no_grad():
            want = quantizer(seen.detach()).double().numpy()
        step = quantizer.amax.detach().double().numpy() / 127.0  # per tensor or per output channel
        off = np.abs(ran[dq].astype(np.float64) - want) / step
        out[name] = (off.size, int((off >= 0.5).sum()), float(off.max()))
    return out


def test_tensorrt_inputs_match_eager_torch(int8_export, tiny_eager, calib_dir, held_out_dir):
    """The exact Q/DQ files TensorRT would build, run by ONNX Runtime, against eager torch:
    ModelOpt's fake-quantized modules (same calibration) and the fp32 model."""
    import onnxruntime as ort
    import torch

    from dfosd.calibration.data import load_tiles
    from dfosd.calibration.quantize import calibrate_onestep
    from dfosd.calibration.recipe import QuantRecipe
    from dfosd.engines.tensorrt_build import QDQ_OPT_LEVEL, plan_jobs

    jobs = plan_jobs(int8_export)
    assert [j.stem for j in jobs] == ["decoder_b1", "encoder_b1", "unet_b1"]
    assert all(j.qdq and j.optimization_level == QDQ_OPT_LEVEL and j.precision == "int8" for j in jobs)
    # the same tiles, recipe and thread count as the export: calibration is deterministic
    fake = calibrate_onestep(tiny_eager, load_tiles(calib_dir, TILE, CALIB_COUNT).tiles,
                             QuantRecipe(precision="int8", float_precision="fp32"), ("encoder", "unet", "decoder"))
    x = load_tiles(held_out_dir, TILE, 4).tiles[:1]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # no QLinear fusion
    by_component = {j.component: j for j in jobs}
    for name in ("encoder", "unet", "decoder"):
        job = by_component[name]
        sess = ort.InferenceSession(str(job.onnx), opts, providers=["CPUExecutionProvider"])
        ort_out = sess.run(None, {job.contract.inputs[0].name: x.numpy()})[0].astype(np.float64)
        with torch.no_grad():
            # the decoder also returns its sr_nonfinite flag: compare the image
            fq = _image(fake.parts[name](x)).double().numpy()
            fp32 = _image(tiny_eager.part(name)(x)).double().numpy()
        quant_err, ort_err = np.abs(fq - fp32).mean(), np.abs(ort_out - fp32).mean()
        pairs = _qdq_pairs_against_fake_quant(job.onnx, fake.parts[name], x)
        found = [p for p in pairs.values() if p]
        print(f"{name}: mean |fake-quant - fp32| {quant_err:.4g}, |ORT - fp32| {ort_err:.4g}, "
              f"|ORT - fake-quant| {np.abs(ort_out - fq).mean():.4g} (float noise, cascaded); {len(found)} Q/DQ "
              f"pairs on the same inputs: {sum(p[1] for p in found)} of {sum(p[0] for p in found)} values differ "
              f"(at most {max(p[1] for p in found)} in one pair), largest {max(p[2] for p in found):.3g} steps")
        # the graph carries ModelOpt's quantization: the same error against fp32 ...
        assert 0.5 * quant_err <= ort_err <= 2.0 * quant_err, name
        # ... made by exactly the calibrated quantizers, each with its scale, axis and pre-quant
        # scale: the same 8-bit values from the same input, but for rare rounding ties (x/scale
        # within an ulp of .5; ~1e-5 of the values, measured), each one step apart
        assert sorted(q for q, p in pairs.items() if p is None) == [], name
        assert all(p[2] <= 1.0 + 1e-3 and p[1] <= 2 + 1e-4 * p[0] for p in found), name
        x = torch.from_numpy(fp32).float() if name != "decoder" else x


def test_parity_report_per_component(tiny_ckpt, calib_dir, held_out_dir, int8_export, tiny_export_fp32,
                                     tiny_eager, tmp_path):
    from dfosd.bench.parity import format_report, parity_report
    from dfosd.core.errors import DfosdError

    exports = {"fp32 (no 8-bit)": tiny_export_fp32}
    for choice in ("unet", "vae-enc", "vae-dec"):
        exports[f"int8 {choice}"] = export_8bit(tiny_ckpt, calib_dir, tmp_path / choice, quantize=choice).out_dir
    exports["int8 all"] = int8_export
    rows = parity_report(exports, tiny_eager, held_out_dir, max_tiles=16)
    print("\n" + format_report(rows))
    by = {r.label: r for r in rows}
    assert all(r.tiles == 16 for r in rows)
    assert by["fp32 (no 8-bit)"].psnr_db > 60 and by["fp32 (no 8-bit)"].max_abs <= 2
    assert [by[f"int8 {c}"].quantized for c in ("unet", "vae-enc", "vae-dec")] == [
        ("unet",), ("encoder",), ("decoder",)]
    for label, row in by.items():
        if label.startswith("int8"):
            assert 20 < row.psnr_db < 60 and row.max_abs > 2, label
    with pytest.raises(DfosdError, match="held-out"):
        parity_report({"int8 all": int8_export}, tiny_eager, calib_dir)


def test_reexport_is_reused_and_new_photos_change_the_key(tiny_ckpt, calib_dir, int8_export, tmp_path):
    from dfosd.core.bases import base_fingerprint
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.manifest import build_key
    from dfosd.export.artifacts import ExportConfig, export_inputs

    again = export_8bit(tiny_ckpt, calib_dir, int8_export)
    assert again.reused
    other = shutil.copytree(calib_dir, tmp_path / "other")
    (other / "chelsea.png").unlink()
    ckpt = read_checkpoint(tiny_ckpt)

    def key(folder):
        cfg = ExportConfig.from_options(precision="int8", float_precision="fp32", tile=TILE, calib_data=str(folder),
                                        calib_count=CALIB_COUNT)
        inputs = export_inputs(TINY, base_fingerprint(TINY), ckpt, cfg)
        inputs["config"]["quant"].pop("calib_data")  # only the photos differ, not the path
        return build_key(inputs)

    assert key(calib_dir) == key(shutil.copytree(calib_dir, tmp_path / "same")) != key(other)


# --- FP8, fp16 floats, CLI --------------------------------------------------------------


def test_fp8_export_is_standard_qdq_that_onnxruntime_runs(fp8_export, tiny_eager, held_out_dir):
    import onnx

    from dfosd.bench.parity import parity_report

    m = _manifest(fp8_export)
    assert m["calibration"]["recipe"]["algorithm"] == "max" and m["calibration"]["recipe"]["weights"] == "per-tensor"
    for entry in m["components"].values():
        assert entry["opset"] == 19 and entry["fp8_ops_standardized"] > 0
        assert entry["qdq"]["zero_point_types"] == ["FLOAT8E4M3FN"] and entry["qdq"]["custom_ops"] == []
        assert entry["qdq"]["per_channel_dequantize"] == 0
        model = onnx.load(str(fp8_export / entry["onnx"]))
        onnx.checker.check_model(model)
        assert [o.domain for o in model.opset_import] == [""]
    (row,) = parity_report({"fp8 all": fp8_export}, tiny_eager, held_out_dir)
    print(f"\nfp8 all: PSNR {row.psnr_db:.2f} dB, max {row.max_abs}, mean {row.mean_abs:.3f}")
    assert 15 < row.psnr_db < 60


def test_int8_with_fp16_floats(tiny_ckpt, calib_dir, tiny_eager, held_out_dir, tmp_path):
    """fp16 around the Q/DQ (TensorRT strongly typed): fp16 scales, opset 19, runs in ONNX Runtime."""
    import onnx

    from dfosd.bench.parity import parity_report

    out = export_8bit(tiny_ckpt, calib_dir, tmp_path / "int8_fp16", float_precision="fp16").out_dir
    for entry in _manifest(out)["components"].values():
        model = onnx.load(str(out / entry["onnx"]))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        scales = {inits.get(n.input[1]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
        assert scales == {onnx.TensorProto.FLOAT16} and entry["opset"] == 19, entry["onnx"]
    (row,) = parity_report({"int8 fp16": out}, tiny_eager, held_out_dir, max_tiles=8)
    print(f"\nint8 with fp16 floats: PSNR {row.psnr_db:.2f} dB, max {row.max_abs}")
    assert 20 < row.psnr_db < 60


def test_cli_int8_export(tiny_ckpt, calib_dir, tmp_path):
    from click.testing import CliRunner

    from dfosd.export.cli import main

    out = tmp_path / "cli_int8"
    args = ["--ckpt", str(tiny_ckpt), "--base", TINY, "--tile", str(TILE), "--out", str(out),
            "--backend", "onnxruntime", "--precision", "int8", "--float-precision", "fp32"]
    result = CliRunner().invoke(main, args + ["--calib-data", str(calib_dir), "--calib-count", "4",
                                              "--quantize", "vae-dec"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)  # ModelOpt's prints stay off stdout
    assert "decoder: " in result.stderr and "Conv2d" in result.stderr
    m = _manifest(out)
    assert m["calibration"]["components"] == ["decoder"] and m["calibration"]["tiles"] == 4
    assert {c["component"]: c["precision"] for c in m["components"].values()} == {
        "encoder": "fp32", "unet": "fp32", "decoder": "int8"}
    bad = CliRunner().invoke(main, args)
    assert bad.exit_code != 0 and "--calib-data" in bad.output
    bad = CliRunner().invoke(main, args + ["--calib-data", str(calib_dir), "--quantize", "vae"])
    assert bad.exit_code != 0 and "--quantize 'vae'" in bad.output


def test_parity_cli_compares_exports_and_names_bad_inputs(int8_export, tiny_export_fp32, held_out_dir, calib_dir,
                                                         tmp_path):
    from click.testing import CliRunner

    from dfosd.bench.parity_cli import main
    from dfosd.core.checkpoint import write_random_checkpoint
    from dfosd.core.bases import load_base
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    report = tmp_path / "parity.json"
    ok = CliRunner().invoke(main, [str(tiny_export_fp32), str(int8_export), "--photos", str(held_out_dir),
                                   "--max-tiles", "4", "--json", str(report)])
    assert ok.exit_code == 0, ok.output
    rows = {r["precision"]: r for r in json.loads(report.read_text())["rows"]}
    assert rows["fp32"]["psnr_db"] > 60 and rows["int8"]["quantized"] == ["encoder", "unet", "decoder"]
    assert 20 < rows["int8"]["psnr_db"] < 60 and rows["int8"]["tiles"] == 4
    assert "PSNR dB" in ok.stdout
    # the calibration photos are not held out
    bad = CliRunner().invoke(main, [str(int8_export), "--photos", str(calib_dir)])
    assert bad.exit_code == 1 and "held-out" in bad.output and "Traceback" not in bad.output
    # exports of two different checkpoints cannot share one reference
    other_ckpt = write_random_checkpoint(tmp_path / "other.safetensors", load_base(TINY), seed=1)
    other = export_checkpoint(other_ckpt, TINY, tmp_path / "other", ExportConfig(precision="fp32", tile=TILE)).out_dir
    bad = CliRunner().invoke(main, [str(tiny_export_fp32), str(other), "--photos", str(held_out_dir)])
    assert bad.exit_code == 1 and "different checkpoints" in bad.output
