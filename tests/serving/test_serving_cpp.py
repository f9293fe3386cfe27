"""The C++ runner (serving/cpp, dfosd_runner): built with CMake against the torch wheel's libtorch,
run on AOTInductor CPU packages, compared byte for byte with the Python runtime on the same packages.

Fast path (always): three stand-in parts with the real contracts (small tensor programs, ~10 s
each to compile) -- the real compile -> package -> manifests -> C++ load -> chain -> tiling/blending
-> PPM path. The runner reads every contract (parts, tensors, tile, batch, scale, package names)
from the export's manifest.json and manifest.aoti.json; the error paths run on copies of those
manifests (no compiling). Slow path (DFOSD_SLOW=1): the synthetic:tiny model's real packages
(~2 min to compile on 2 cores).

The build is cached per source hash and torch version in ``$DFOSD_CPP_BUILD_CACHE`` (default
``~/.cache/dfosd/cpp-build``), so only the first session pays for it (~15-40 s with -j2).

The TensorRT kind cannot be built here (no TensorRT): test_serving_cpp_tensorrt.py checks its
names and compiles it against headers; its plan lookup runs here through ``--check``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import STAND_IN_BATCH as BATCH
from conftest import STAND_IN_TILE as TILE

CPP = Path(__file__).resolve().parents[2] / "serving" / "cpp"
API = Path(__file__).resolve().parents[1] / "data" / "tensorrt-api"  # copy of shared/tensorrt-api
HAVE_TOOLS = all(shutil.which(t) for t in ("cmake", "make", "c++"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="needs cmake, make and a C++ compiler")


def _source_key() -> str:
    import torch

    h = hashlib.sha256(torch.__version__.encode())
    for p in sorted(CPP.rglob("*")):
        if p.is_file() and "build" not in p.parts:
            h.update(p.relative_to(CPP).as_posix().encode() + p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def cpp_runner() -> tuple[Path, str]:
    """(path of dfosd_runner, cmake's configure output), built once per source version."""
    import torch.utils

    cache = Path(os.environ.get("DFOSD_CPP_BUILD_CACHE", Path.home() / ".cache" / "dfosd" / "cpp-build"))
    build = cache / _source_key()
    exe = build / "dfosd_runner"
    log = build / "configure.txt"
    if not (exe.is_file() and log.is_file()):
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        nice = ["nice", "-n", "15"] if shutil.which("nice") else []
        conf = subprocess.run([*nice, "cmake", "-S", str(CPP), "-B", str(build),
                               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                              capture_output=True, text=True, timeout=300)
        assert conf.returncode == 0, conf.stdout + conf.stderr
        make = subprocess.run([*nice, "make", "-C", str(build), "-j2"], capture_output=True, text=True, timeout=900)
        assert make.returncode == 0, make.stdout[-4000:] + make.stderr[-4000:]
        log.write_text(conf.stdout + conf.stderr)
    return exe, log.read_text()


def _write_ppm(path: Path, chw) -> None:
    from PIL import Image

    Image.fromarray(chw.permute(1, 2, 0).numpy()).save(path)  # .ppm suffix: Pillow writes binary P6


def _read_ppm(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def stand_in_export(aoti_stand_in_export):
    return aoti_stand_in_export


def _python_reference(export: Path, image, overlap: int, batch: int):
    from dfosd.runtime.step import OneStepRunner
    from dfosd.runtime.tiling import TilingConfig, upscale_tiled

    runner = OneStepRunner(export, backend="aoti", batch=batch, say=lambda m: None)
    return upscale_tiled(image, runner, TilingConfig(tile=runner.tile, overlap=overlap, batch=runner.batch,
                                                     scale=runner.scale))


def _images():
    import torch

    g = torch.Generator().manual_seed(7)
    # several tiles with a flush last row/column; smaller than a tile (reflect pad); a 1-pixel axis; one tile
    sizes = [(40, 27), (10, 5), (1, 20), (16, 16)]
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


# ---------------------------------------------------------------- tests


@needs_tools
def test_cmake_says_which_kinds_it_builds(cpp_runner):
    exe, configure = cpp_runner
    assert "AOTInductor engine kind: ON" in configure
    trt = [line for line in configure.splitlines() if "TensorRT engine kind" in line]
    assert trt and ("OFF --" in trt[0] or "ON" in trt[0]), configure
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "engine kinds built into this binary: aoti" in out.stdout


@needs_tools
def test_cpp_aoti_runner_equals_python_runtime(cpp_runner, stand_in_export, tmp_path):
    exe, _ = cpp_runner
    images = _images()
    args = []
    for i, img in enumerate(images):
        _write_ppm(tmp_path / f"in{i}.ppm", img)
        args += [str(tmp_path / f"in{i}.ppm"), str(tmp_path / f"out{i}.ppm")]
    run = subprocess.run([str(exe), "aoti", "--engines", str(stand_in_export), "--batch", str(BATCH),
                          "--device", "cpu", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    # tile, batch and scale came from the manifest; the chain is shown as read
    assert f"AOTInductor packages on cpu (tile {TILE}, batch {BATCH}, scale 4)" in run.stderr
    assert f"encoder_b{BATCH}: lr_image uint8 [{BATCH}, 3, {TILE}, {TILE}] -> latent float32" in run.stderr
    for i, img in enumerate(images):
        got = _read_ppm(tmp_path / f"out{i}.ppm")
        want = _python_reference(stand_in_export, img, TILE // 4, BATCH)
        assert got.shape == want.shape == (3, img.shape[1] * 4, img.shape[2] * 4)
        assert (got.int() - want.int()).abs().max().item() == 0, f"image {i} differs from the Python runtime"
    # an explicit overlap, and explicit part files (moved elsewhere) checked against the export's contracts
    moved = tmp_path / "moved"
    moved.mkdir()
    files = {}
    for p in ("encoder", "unet", "decoder"):
        files[p] = moved / f"{p}.pt2"
        files[p].symlink_to(stand_in_export / f"{p}_b{BATCH}.cpu.pt2")
    run = subprocess.run([str(exe), "aoti", "--engines", str(stand_in_export), "--encoder", str(files["encoder"]),
                          "--unet", str(files["unet"]), "--decoder", str(files["decoder"]), "--overlap", "2",
                          args[0], str(tmp_path / "o2.ppm")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _read_ppm(tmp_path / "o2.ppm").equal(_python_reference(stand_in_export, images[0], 2, BATCH))


@needs_tools
def test_cpp_runner_bad_inputs(cpp_runner, stand_in_export, tmp_path):
    exe, _ = cpp_runner
    import torch

    _write_ppm(tmp_path / "ok.ppm", torch.zeros(3, 8, 8, dtype=torch.uint8))
    (tmp_path / "bad.ppm").write_bytes(b"P6\n8 8\n255\n" + b"\0" * 10)  # truncated pixels
    (tmp_path / "text.ppm").write_bytes(b"P3\n1 1\n255\n0 0 0\n")      # ASCII PPM
    base = [str(exe), "aoti", "--engines", str(stand_in_export), "--batch", str(BATCH)]
    run = subprocess.run([*base, str(tmp_path / "bad.ppm"), str(tmp_path / "o1.ppm"), str(tmp_path / "text.ppm"),
                          str(tmp_path / "o2.ppm"), str(tmp_path / "ok.ppm"), str(tmp_path / "o3.ppm")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "truncated pixel data" in run.stderr and "not a binary PPM (P6)" in run.stderr
    assert (tmp_path / "o3.ppm").is_file() and not (tmp_path / "o1.ppm").exists()
    assert not list(tmp_path.glob("*.tmp"))
    for bad_args, message in [([*base, "--overlap", "8", "a", "b"], "smaller than half"),
                              ([*base, "a"], "pairs"),
                              ([str(exe), "tensorrt", "--engines", str(stand_in_export), "a", "b"], "not built into"),
                              ([*base[:-2], "--batch", "x", "a", "b"], "not an integer"),
                              ([*base, "--batch", "2", "a", "b"], "given twice"),
                              ([*base, "--tile", str(TILE), "a", "b"], "read from the export's manifest.json"),
                              ([str(exe), "aoti", "--encoder", "e.pt2", "a", "b"], "--engines DIR is needed"),
                              ([*base, "--vae", "v.pt2", "a", "b"], "has no part 'vae' (its parts: encoder, unet,"),
                              ([*base, "--device", "cuda", "a", "b"], "no packages for cuda (it has packages for cpu);"),
                              ([*base, "--check", "a", "b"], "--check takes no image files")]:
        run = subprocess.run(bad_args, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and message in run.stderr, (bad_args, run.stderr)


@needs_tools
def test_cpp_runner_fails_an_image_whose_decoder_made_nan(cpp_runner, stand_in_export, tmp_path):
    """The decoder's sr_nonfinite flag (the stand-in turns an all-white tile into NaN): that image
    fails with a message and writes nothing, the next image is still upscaled; the Python runtime
    refuses the same tile."""
    import torch

    from dfosd.runtime.step import NonFiniteOutput, OneStepRunner

    white = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    _write_ppm(tmp_path / "white.ppm", white)
    _write_ppm(tmp_path / "ok.ppm", _images()[3])
    run = subprocess.run([
        str(cpp_runner[0]), "aoti", "--engines", str(stand_in_export), "--batch", str(BATCH), str(tmp_path / "white.ppm"),
        str(tmp_path / "o1.ppm"), str(tmp_path / "ok.ppm"), str(tmp_path / "o2.ppm")],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert f"decoder_b{BATCH} produced NaN or Inf before its uint8 cast (sr_nonfinite, tile 0 of this batch)" \
        in run.stderr
    assert not (tmp_path / "o1.ppm").exists() and (tmp_path / "o2.ppm").is_file()
    runner = OneStepRunner(stand_in_export, backend="aoti", batch=BATCH, say=lambda m: None)
    with pytest.raises(NonFiniteOutput, match=r"decoder produced NaN or Inf before its uint8 cast \(sr_nonfinite, "
                                              r"tile 1 of this batch\)"):
        runner(torch.stack([_images()[3][:, :TILE, :TILE], torch.full((3, TILE, TILE), 255, dtype=torch.uint8)]))
    assert runner(torch.stack([_images()[3][:, :TILE, :TILE]])).shape == (1, 3, TILE * 4, TILE * 4)


@pytest.mark.slow
@needs_tools
def test_cpp_aoti_runner_on_the_tiny_model(cpp_runner, tiny_ckpt, tmp_path_factory):
    """The synthetic:tiny model's real AOTI packages (dfosd aoti-export), C++ vs Python."""
    from dfosd.engines.aoti_build import export_aoti
    from dfosd.export.artifacts import ExportConfig, export_checkpoint

    exe, _ = cpp_runner
    out = tmp_path_factory.mktemp("cpp_tiny")
    export_checkpoint(tiny_ckpt, "synthetic:tiny", out, ExportConfig(precision="fp32", tile=32, batches=(2,)))
    export_aoti(out, device="cpu", progress=lambda m: None)
    work = tmp_path_factory.mktemp("cpp_tiny_io")
    images = _images()[:2]
    args = []
    for i, img in enumerate(images):
        _write_ppm(work / f"in{i}.ppm", img)
        args += [str(work / f"in{i}.ppm"), str(work / f"out{i}.ppm")]
    run = subprocess.run([str(exe), "aoti", "--engines", str(out), "--batch", "2", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    for i, img in enumerate(images):
        got, want = _read_ppm(work / f"out{i}.ppm"), _python_reference(out, img, 8, 2)
        assert (got.int() - want.int()).abs().max().item() == 0


# ---------------------------------------------------------------- the manifests as the runner reads them


def _copy_export(src: Path, dst: Path) -> Path:
    """The stand-in export's manifests copied, its packages linked (cheap to edit, nothing recompiled)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f)
    return dst


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _fails(exe, export: Path, *extra: str) -> str:
    run = subprocess.run([str(exe), "aoti", "--engines", str(export), *extra, "in.ppm", "out.ppm"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    return run.stderr


@needs_tools
def test_cpp_runner_takes_the_largest_batch_and_checks_the_packages(cpp_runner, stand_in_export, tmp_path):
    """Batches, packages and their records come from the manifests and are checked before anything runs."""
    from dfosd.core.contracts import Geometry, component_contracts

    exe, _ = cpp_runner
    export = _copy_export(stand_in_export, tmp_path / "export")

    def add_batch_1(m):  # contracts for tile batch 1, whose packages were never built
        for name, c in component_contracts(Geometry(tile=TILE, batch=1)).items():
            m["components"][c.stem] = {"component": name, "batch": 1, "onnx": f"{c.stem}.onnx", "precision": "fp32",
                                       "contract": c.to_dict()}
        m["batches"] = [1, BATCH]

    _edit(export / "manifest.json", add_batch_1)
    # the encoder's package under a name written with \u escapes, a surrogate pair too: the reader decodes them
    aoti = export / "manifest.aoti.json"
    (export / f"\u00e9\U0001f600_b{BATCH}.cpu.pt2").symlink_to(stand_in_export / f"encoder_b{BATCH}.cpu.pt2")
    aoti.write_text(aoti.read_text().replace(f'"encoder_b{BATCH}.cpu.pt2"', f'"\\u00e9\\ud83d\\ude00_b{BATCH}.cpu.pt2"'))
    img = _images()[0]
    _write_ppm(tmp_path / "in.ppm", img)
    run = subprocess.run([str(exe), "aoti", "--engines", str(export), str(tmp_path / "in.ppm"),
                          str(tmp_path / "out.ppm")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"tile batch {BATCH}:" in run.stderr and f"batch {BATCH}, scale 4" in run.stderr  # the largest
    assert _read_ppm(tmp_path / "out.ppm").equal(_python_reference(stand_in_export, img, TILE // 4, BATCH))

    assert "manifest.aoti.json: builds.cpu.components: has no package for encoder_b1" in _fails(exe, export,
                                                                                             "--batch", "1")
    assert "has no tile batch 3 (it has [1, 2]); pass --batch 2" in _fails(exe, export, "--batch", "3")
    # a package that changed since it was built (size differs from its record)
    (export / f"unet_b{BATCH}.cpu.pt2").unlink()
    (export / f"unet_b{BATCH}.cpu.pt2").write_bytes(b"not a package")
    err = _fails(exe, export)
    assert f"unet_b{BATCH}.cpu.pt2: changed since it was built (13 bytes" in err and "--force" in err
    (export / f"unet_b{BATCH}.cpu.pt2").unlink()
    assert "missing (" in _fails(exe, export)
    # packages built from an earlier export of this directory
    _edit(export / "manifest.json", lambda m: m.update(build_key="re-exported"))
    assert "built from an earlier export of this directory" in _fails(exe, export)
    (export / "manifest.aoti.json").unlink()
    assert "has no AOTInductor packages (no manifest.aoti.json); build them: dfosd build" in _fails(exe, export)


@needs_tools
def test_cpp_runner_checks_the_contracts(cpp_runner, stand_in_export, tmp_path):
    """The chain (each part's output is the next one's input) and its two ends, from manifest.json."""
    exe, _ = cpp_runner
    assert "has no manifest.json: it is not a dfosd export directory" in _fails(exe, tmp_path)

    def broken(name: str, change) -> Path:
        export = _copy_export(stand_in_export, tmp_path / name)
        _edit(export / "manifest.json", change)
        return export

    def unet(m):
        return m["components"][f"unet_b{BATCH}"]["contract"]

    err = _fails(exe, broken("shape", lambda m: unet(m)["inputs"][0].update(shape=[BATCH, 4, 9, 9])))
    assert (f"encoder_b{BATCH} outputs latent float32 [{BATCH}, 4, 8, 8] but unet_b{BATCH} takes latent float32 "
            f"[{BATCH}, 4, 9, 9]") in err
    err = _fails(exe, broken("name", lambda m: unet(m)["outputs"][0].update(name="x0")))
    assert f"do not form one chain (several parts take an input no other part produces: decoder_b{BATCH}, " in err
    # the decoder takes the encoder's latent too: the chain ends at the decoder, the unet is left over
    err = _fails(exe, broken("fork", lambda m: m["components"][f"decoder_b{BATCH}"]["contract"]["inputs"][0].update(
        name="latent")))
    assert f"the chain breaks after decoder_b{BATCH}: its output sr_image" in err
    assert f"is no other part's input (parts left over: unet_b{BATCH})" in err
    err = _fails(exe, broken("tile", lambda m: m.update(tile=32)))
    assert f"the chain starts with lr_image uint8 [{BATCH}, 3, {TILE}, {TILE}]" in err and "(tile 32)" in err
    err = _fails(exe, broken("dtype", lambda m: unet(m)["inputs"][0].update(dtype="bfloat16")))
    assert f"components.unet_b{BATCH}.contract.inputs[0].dtype: \"bfloat16\" is not one of" in err
    err = _fails(exe, broken("missing", lambda m: unet(m).pop("outputs")))
    assert f"manifest.json: components.unet_b{BATCH}.contract: has no \"outputs\"" in err
    err = _fails(exe, broken("format", lambda m: m.update(format=1)))
    assert "format: manifest format 1; this dfosd_runner reads 2" in err
    err = _fails(exe, broken("batches", lambda m: m.update(batches=[1, BATCH])))
    assert f"batches: lists tile batches [1, {BATCH}] but components has parts for [{BATCH}]" in err


@needs_tools
def test_cpp_runner_finds_tensorrt_plans_by_their_records(cpp_runner, stand_in_export, tmp_path):
    """--check: the tensorrt kind's lookup (each part's <stem>.plan.json) without TensorRT; the plans are fake."""
    from dfosd.core.manifest import file_record
    from dfosd.core.vocab import plan_manifest_name, plan_name

    exe, _ = cpp_runner
    export = _copy_export(stand_in_export, tmp_path / "export")
    files = json.loads((export / "manifest.json").read_text())["files"]
    for part in ("encoder", "unet", "decoder"):
        stem = f"{part}_b{BATCH}"
        (export / plan_name(stem)).write_bytes(b"not really a plan " + stem.encode())
        (export / plan_manifest_name(stem)).write_text(json.dumps({
            "format": 1, "kind": "dfosd-tensorrt-plan", "stem": stem, "plan": plan_name(stem),
            "plan_file": file_record(export / plan_name(stem)), "onnx": f"{stem}.onnx",
            "onnx_files": {n: r for n, r in files.items() if n in (f"{stem}.onnx", f"{stem}.onnx.data")}}))
    check = [str(exe), "tensorrt", "--engines", str(export), "--check"]
    run = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"tile {TILE}, batch {BATCH}, scale 4" in run.stdout
    assert f"unet_b{BATCH}: latent float32 [{BATCH}, 4, 8, 8] -> denoised_latent float32 [{BATCH}, 4, 8, 8]  " \
           f"{export / plan_name(f'unet_b{BATCH}')}" in run.stdout
    run = subprocess.run([*check[:-1], "in.ppm", "out.ppm"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "engine kind 'tensorrt' is not built into this binary" in run.stderr
    # the rule of tensorrt_common.plan_problems: built from exactly this export's ONNX files
    _edit(export / plan_manifest_name(f"decoder_b{BATCH}"),
          lambda r: r.update(onnx_files={f"decoder_b{BATCH}.onnx": {"sha256": "0" * 64, "bytes": 1}}))
    run = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"the plan was built from another decoder_b{BATCH}.onnx" in run.stderr
    assert "rebuild: dfosd build" in run.stderr and "--backend tensorrt" in run.stderr
    (export / plan_manifest_name(f"decoder_b{BATCH}")).unlink()
    run = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and f"has no TensorRT plan for decoder_b{BATCH}" in run.stderr


# Malformed manifests (strict JSON: what Python's json module writes, nothing else) -> where and why.
MALFORMED = [
    ('{"format": 1,}', "1:14: trailing comma before '}'"),
    ('{"format": 01}', "1:13: a number must not have leading zeros"),
    ('{"format": NaN}', "1:12: unexpected character 'N', expected a value"),
    ('{"format": 1} // note', "1:15: unexpected text after the JSON value"),
    ('{"format": 1,\n "format": 1}', '2:2: duplicate key "format"'),
    ('{"build_key": "ab', "1:18: unexpected end of file inside a string"),
    ('{"build_key": "a\tb"}', "1:17: control character inside a string"),
    ('{"build_key": "\\x"}', "unknown escape '\\x'"),
    ('{"build_key": "\\ud800"}', "a high surrogate \\u escape without its low half"),
    ('{"build_key": "\udcff"}', "invalid UTF-8 in a string"),  # a lone 0xff byte (surrogateescape)
    ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
    ("", "1:1: unexpected end of file, expected a value"),
]


@needs_tools
def test_cpp_runner_refuses_malformed_json(cpp_runner, tmp_path):
    exe, _ = cpp_runner
    runs = []
    for i, (text, message) in enumerate(MALFORMED):  # all at once: each run is mostly libtorch's load time
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        runs.append(subprocess.Popen([str(exe), "aoti", "--engines", str(tmp_path / str(i)), "in.ppm", "out.ppm"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for run, (i, (text, message)) in zip(runs, enumerate(MALFORMED)):
        err = run.communicate(timeout=120)[1]
        assert run.returncode == 2, (text, err)
        assert f"{tmp_path / str(i) / 'manifest.json'}:" in err and message in err and "(not valid JSON)" in err, \
            (text, err)
    manifest = tmp_path / "manifest.json"
    # valid, and read exactly: escapes, a surrogate pair, integers, nesting, then the content is checked
    manifest.write_text('{"format": 2, "build_key": "\\u00e9\\ud83d\\ude00\\n", "tile": 16, "upscale": 4, '
                        '"batches": [], "components": {}, "x": [true, false, null, -1.5e3, {}]}')
    assert "components: lists no parts" in _fails(exe, tmp_path)
    manifest.write_text('{"format": 1.0}')
    assert "format: expected an integer, found 1.0" in _fails(exe, tmp_path)


def test_cpp_reader_spells_the_vocabulary():
    """The file names and formats the C++ reader restates are the ones core/vocab.py and the builders use."""
    from dfosd.core import vocab
    from dfosd.core.manifest import MANIFEST_FORMAT
    from dfosd.engines.aoti_build import AOTI_FORMAT
    from dfosd.engines.tensorrt_common import PLAN_FORMAT

    header = (CPP / "src" / "export_dir.h").read_text()
    consts = dict(re.findall(r"constexpr (?:const char\*|int64_t) (k\w+) = \"?([^\";]+)\"?;", header))
    assert consts == {"kManifestName": vocab.MANIFEST_NAME, "kAotiManifestName": vocab.AOTI_MANIFEST_NAME,
                      "kPlanManifestSuffix": vocab.PLAN_MANIFEST_SUFFIX, "kManifestFormat": str(MANIFEST_FORMAT),
                      "kAotiFormat": str(AOTI_FORMAT), "kPlanFormat": str(PLAN_FORMAT),
                      "kNonFiniteName": vocab.SR_NONFINITE}


@needs_tools
def test_cpp_runner_colour_fix_equals_python_runtime(cpp_runner, stand_in_export, tmp_path):
    """--color-fix adain|wavelet, and the export family's default, give the bytes of the Python
    runtime's colour fix (runtime/color_fix.py apply_color_fix, what dfosd-trt-run and the served model apply)."""
    from dfosd.runtime.color_fix import apply_color_fix

    exe, _ = cpp_runner
    img = _images()[0]
    _write_ppm(tmp_path / "in.ppm", img)
    plain = _python_reference(stand_in_export, img, TILE // 4, BATCH)
    family = _copy_export(stand_in_export, tmp_path / "hypir-like")  # a family whose default is wavelet
    _edit(family / "manifest.json", lambda m: m.update(family={**(m.get("family") or {}), "color_fix": "wavelet"}))
    for fix, export, extra in (("adain", stand_in_export, ["--color-fix", "adain"]),
                               ("wavelet", stand_in_export, ["--color-fix", "wavelet"]),
                               ("wavelet", family, []), ("none", family, ["--color-fix", "none"])):
        run = subprocess.run([str(exe), "aoti", "--engines", str(export), "--batch", str(BATCH), *extra,
                              str(tmp_path / "in.ppm"), str(tmp_path / "out.ppm")], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        assert f"colour fix {fix}" in run.stderr
        want = apply_color_fix(plain, img, fix, 4)
        assert _read_ppm(tmp_path / "out.ppm").equal(want), (fix, export.name)
        if fix != "none":
            assert not want.equal(plain)
    assert "--color-fix hsv: use none, adain or wavelet" in _fails(exe, stand_in_export, "--color-fix", "hsv")
