"""Readers refuse what upstream would refuse, with one clear error, and never crash: each case
a hostile run found (tiny tensors; the upstream facts each case follows are in core/readers.py)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import TINY
from dfosd.cli import main
from dfosd.core.errors import DfosdError
from dfosd.core.readers import read_model


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def osediff_dict(osediff_pkl):
    return torch.load(osediff_pkl, weights_only=True)


def _refused(path, match, **kw):
    with pytest.raises(DfosdError, match=match) as info:
        read_model(path, base_spec=TINY, encode=False, **kw)
    return str(info.value)


def test_osediff_listing_vae_lora_without_its_weights_is_refused(osediff_dict, tmp_path):
    sd = {k: v for k, v in osediff_dict.items() if k != "state_dict_vae"}
    torch.save(sd, tmp_path / "osediff.pkl")
    n = len(set(sd["vae_lora_encoder_modules"]))
    _refused(tmp_path / "osediff.pkl", f"lists {n} VAE-encoder module\\(s\\) but the file has no state_dict_vae")


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update(rank_unet="four"), "rank_unet is 'four'; expected a positive integer"),
    (lambda sd: sd.update(state_dict_unet=list(sd["state_dict_unet"].values())),
     "state_dict_unet is a list, expected a dict of name -> tensor"),
    (lambda sd: sd["state_dict_unet"].update({next(iter(sd["state_dict_unet"])): [1.0, 2.0]}),
     "state_dict_unet: 1 entr\\(ies\\) that are not name -> tensor"),
    (lambda sd: sd.update(unet_lora_others_modules=7), "unet_lora_others_modules is not a list of module names"),
    (lambda sd: sd.pop("rank_vae"), "rank_vae is missing"),
])
def test_malformed_osediff_fields_are_clear_errors(osediff_dict, tmp_path, edit, match):
    sd = {k: (dict(v) if isinstance(v, dict) else v) for k, v in osediff_dict.items()}
    edit(sd)
    torch.save(sd, tmp_path / "osediff.pkl")
    _refused(tmp_path / "osediff.pkl", match)


def _kohya_file(tiny_base, path, alphas):
    """kohya keys for the first len(alphas) attention projections (alpha None: no alpha key)."""
    mods = [n for n, m in tiny_base.unet.named_modules() if n.endswith("to_q")][:len(alphas)]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, alpha in zip(mods, alphas):
        lin = dict(tiny_base.unet.named_modules())[name]
        stem = "lora_unet_" + name.replace(".", "_")
        tensors[stem + ".lora_down.weight"] = torch.randn(4, lin.in_features, generator=g)
        tensors[stem + ".lora_up.weight"] = torch.randn(lin.out_features, 4, generator=g)
        if alpha is not None:
            tensors[stem + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def test_kohya_alpha_zero_reads_as_rank_and_inspect_shows_each_scale(tiny_base, tmp_path):
    path = _kohya_file(tiny_base, tmp_path / "kohya.safetensors", [0.0, 2.0])
    model = read_model(path, family="hypir", base_spec=TINY, base=tiny_base, encode=False)
    assert sorted((s.alpha, s.scale) for s in model.lora_sets) == [(2.0, 0.5), (4.0, 1.0)]  # kohya-ss: 0 -> rank
    r = CliRunner().invoke(main, ["inspect", str(path), "--family", "hypir", "--base", TINY])
    assert r.exit_code == 0, r.output
    assert "rank 4, alpha 4, scale 1, 1 layers" in r.output and "rank 4, alpha 2, scale 0.5, 1 layers" in r.output


def test_kohya_alpha_of_two_numbers_is_refused(tiny_base, tmp_path):
    path = _kohya_file(tiny_base, tmp_path / "kohya.safetensors", [[1.0, 2.0]])
    _refused(path, r"alpha is a tensor of shape \[2\]; alpha is one finite number", family="hypir", base=tiny_base)


def test_diffusers_alpha_that_is_not_a_number_is_refused(tmp_path):
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)},
              str(tmp_path / "lora.safetensors"), metadata={"lora_alpha": "abc"})
    _refused(tmp_path / "lora.safetensors", "header lora_alpha = 'abc' is not a number", family="hypir")


def _format2(tmp_path, tiny_base, **edits):
    """A format-2 file of the tiny checkpoint with header fields or tensors replaced."""
    from safetensors import safe_open

    from dfosd.core.checkpoint import read_checkpoint, write_random_checkpoint
    from dfosd.core.srmodel import from_format1, write_model

    src = write_model(tmp_path / "model.safetensors",
                      from_format1(read_checkpoint(write_random_checkpoint(tmp_path / "f1.safetensors", tiny_base))))
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in edits.items():
        (tensors if isinstance(v, torch.Tensor) else meta)[k] = v
    save_file(tensors, str(src), metadata=meta)
    return src


@pytest.mark.parametrize("lora_sets, match", [
    ('{"part": "unet"}', "lora_sets is a JSON dict, expected a list"),
    ('[{"part": "unet", "name": "dfosd", "rank": "four", "alpha": 4}]', r"lora_sets\[0\] = .* is not a record"),
    ('[{"part": "unet", "name": "dfosd", "rank": 4, "alpha": "abc"}]', r"lora_sets\[0\] = .* is not a record"),
    ('[7]', r"lora_sets\[0\] = 7 is not a record"),
])
def test_odd_format2_lora_sets_are_clear_errors(tiny_base, tmp_path, lora_sets, match):
    _refused(_format2(tmp_path, tiny_base, lora_sets=lora_sets), match)


def test_format2_integer_embedding_is_refused_like_format1(tiny_base, tmp_path):
    from dfosd.core.srmodel import validate_model

    path = _format2(tmp_path, tiny_base, text_embedding=torch.zeros(1, 8, tiny_base.cross_attention_dim,
                                                                     dtype=torch.int64))
    with pytest.raises(DfosdError, match="1 tensor\\(s\\) are not floating point: text_embedding"):
        validate_model(read_model(path), tiny_base)


def test_zip_bomb_is_refused_before_anything_is_inflated(tmp_path, monkeypatch):
    bomb = tmp_path / "osediff.pkl"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KB
    assert bomb.stat().st_size < 1 << 20

    def no_load(*a, **k):
        raise AssertionError("torch.load ran on a zip bomb")

    monkeypatch.setattr(torch, "load", no_load)
    msg = _refused(bomb, "refused before reading")
    assert f"declare {64 << 20:,} bytes" in msg


@pytest.mark.parametrize("name, data, what", [
    ("x.json", b'{"a": 1}', "a JSON file"),
    ("x.bin", b'[1, 2, 3]', "a JSON file"),
    ("x.pkl", b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "a PNG image"),
    ("model.onnx", b"\x08\x07\x12\x07pytorch", "an ONNX graph"),
    ("x.pth", b"\xff\xd8\xff\xe0" + b"\0" * 32, "a JPEG image"),
])
def test_inspect_names_what_a_non_checkpoint_file_is(tmp_path, name, data, what):
    (tmp_path / name).write_bytes(data)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / name)])
    assert r.exit_code == 1 and f"is {what}, not a checkpoint" in r.output, r.output
    assert "Traceback" not in r.output


def test_convert_validates_against_the_base_as_export_does(tiny_base, tmp_path):
    name = next(n for n, m in tiny_base.unet.named_modules() if n.endswith("to_q"))
    lin = dict(tiny_base.unet.named_modules())[name]
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, lin.in_features + 1),
               f"unet.{name}.lora_B.weight": torch.zeros(lin.out_features, 4)}, str(tmp_path / "lora.safetensors"))
    out = tmp_path / "model.safetensors"
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "lora.safetensors"), "--out", str(out), "--family", "hypir",
                                  "--base", TINY])
    assert r.exit_code == 1 and "do not fit the base" in r.output and name in r.output, r.output
    assert not out.exists()


def test_edited_family_color_fix_is_one_clear_error(tiny_export_fp32, tmp_path):
    from dfosd.core.manifest_check import check_export_manifest

    data = json.loads((tiny_export_fp32 / "manifest.json").read_text())
    check_export_manifest(data, tmp_path / "manifest.json")  # as exported: fine
    data.setdefault("family", {})["color_fix"] = "sepia"
    with pytest.raises(DfosdError, match="family.color_fix 'sepia' is not one of none, adain, wavelet"):
        check_export_manifest(data, tmp_path / "manifest.json")


def test_an_edited_cached_backend_choice_is_measured_again():
    from dfosd.runtime.backend_choice import _usable_choice

    backends = {"onnxruntime": object(), "openvino": object()}
    good = {"parts": {"encoder": "openvino", "unet": "onnxruntime", "decoder": "openvino"}}
    assert _usable_choice(good, backends)
    for bad in ({"parts": {"encoder": "openvino"}}, {"parts": {**good["parts"], "unet": "bogus"}}, {"parts": "x"}, 3):
        assert not _usable_choice(bad, backends)


def test_trt_run_with_an_edited_color_fix_fails_once_before_any_image(tiny_export_fp32, tmp_path):
    import shutil

    from PIL import Image

    from dfosd.runtime.cli import main as run_main

    engines = tmp_path / "engines"
    shutil.copytree(tiny_export_fp32, engines)
    data = json.loads((engines / "manifest.json").read_text())
    data.setdefault("family", {})["color_fix"] = "sepia"
    (engines / "manifest.json").write_text(json.dumps(data))
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16), (90, 120, 30)).save(tmp_path / name)
    r = CliRunner().invoke(run_main, [str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--engines", str(engines),
                                      "--out", str(tmp_path / "o"), "--no-progress"])
    assert r.exit_code == 1 and r.output.count("family.color_fix 'sepia'") == 1, r.output
    assert "KeyError" not in r.output and "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_an_image_named_safetensors_is_named_as_an_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "lora.safetensors", format="PNG")
    _refused(tmp_path / "lora.safetensors", "is a PNG image, not a checkpoint")


def test_hypir_state_dict_with_a_list_where_a_tensor_goes_is_a_clear_error(tmp_path):
    torch.save({"conv_in.lora_A.default.weight": torch.zeros(4, 4, 3, 3),
                "conv_in.lora_B.default.weight": [0.0] * 4}, tmp_path / "HYPIR_sd2.pth")
    _refused(tmp_path / "HYPIR_sd2.pth", "the state dict: 1 entr\\(ies\\) that are not name -> tensor, "
                                         "e.g. conv_in.lora_B.default.weight")
