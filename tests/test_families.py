"""Upstream one-step SR checkpoints (OSEDiff, PiSA-SR, HYPIR) -> dfosd: readers, convert, export parity.

Each checkpoint is written in its project's own container and layout (tests/upstream_way.py);
the reference runs it the upstream way with peft adapters left unmerged. Parity is measured
on the exported ONNX files through ONNX Runtime.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import upstream_way as uw
from conftest import TINY
from dfosd.core.errors import DfosdError
from dfosd.core.metrics import psnr_uint8
from dfosd.core.readers import read_model

TILE = 32
FAMILIES = {"osediff": (uw.write_osediff, uw.run_osediff),
            "pisa-sr": (uw.write_pisa, uw.run_pisa),
            "hypir": (uw.write_hypir, uw.run_hypir)}
PROMPT = "a photo, sharp"
PARITY = {}  # family -> precision -> dB, printed at the end (README numbers come from here)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield
    if PARITY:
        print("\nparity vs upstream-way reference (PSNR dB):", json.dumps(PARITY))


@pytest.fixture(scope="module")
def upstream_files(tiny_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream")
    names = {"osediff": "osediff.pkl", "pisa-sr": "pisa_sr.pkl", "hypir": "HYPIR_sd2.pth"}
    return {fam: FAMILIES[fam][0](folder / names[fam], tiny_base) for fam in FAMILIES}


@pytest.fixture(scope="module")
def text_models():
    from dfosd.core.text import load_text_models

    return load_text_models(TINY)


@pytest.fixture(scope="module")
def lr():
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(TILE, TILE), mode="bicubic")
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_matches_upstream_inference(family, upstream_files, tiny_base, text_models, lr, tmp_path):
    from dfosd.export.artifacts import ExportConfig, export_checkpoint
    from dfosd.runtime.step import OneStepRunner

    ref = FAMILIES[family][1](upstream_files[family], tiny_base, lr, text_models, prompt=PROMPT).numpy()
    assert np.isfinite(ref).all() and ref.std() > 10  # a real image, not a constant
    said = []
    for precision, floor in (("fp32", 50.0), ("fp16", 35.0)):
        out = export_checkpoint(upstream_files[family], TINY, tmp_path / precision,
                                ExportConfig(precision=precision, tile=TILE, batches=(1,)), prompt=PROMPT,
                                progress=said.append)
        got = OneStepRunner(out.out_dir, backend="onnxruntime", batch=1)(lr).numpy()
        db = psnr_uint8(got, ref)
        PARITY.setdefault(family, {})[precision] = round(db, 2)
        assert db >= floor, f"{family} {precision}: {db:.2f} dB"
        fam = out.manifest["family"]
        assert fam["name"] == family and fam["prompt"] == PROMPT and fam["deviations"]
    assert any(f"family {family} (" in s for s in said)  # what was detected, and why


def test_merge_is_what_unmerged_peft_computes(upstream_files, tiny_base, text_models, lr):
    """Without the merge, the same model misses the reference by far: parity above is not vacuous."""
    from dataclasses import replace

    from dfosd.core.onestep import build_from_model

    model = read_model(upstream_files["osediff"], base_spec=TINY, prompt=PROMPT)
    ref = uw.run_osediff(upstream_files["osediff"], tiny_base, lr, text_models, prompt=PROMPT).numpy()
    merged = build_from_model(tiny_base, model)(lr).numpy()
    bare = build_from_model(tiny_base, replace(model, lora_sets=(), replacements={}))(lr).numpy()
    assert psnr_uint8(merged, ref) >= 50.0 > psnr_uint8(bare, ref) + 20


def test_pil_bicubic_in_graph_matches_pillow(tiny_base):
    from PIL import Image

    from dfosd.core.resample import pil_bicubic_upscale

    g = np.random.default_rng(0)
    img = np.asarray(Image.fromarray(g.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize((40, 48), Image.NEAREST))
    img = np.clip(img + g.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(img).resize((160, 192))).astype(int)  # Pillow's default: bicubic
    got = pil_bicubic_upscale(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 4)[0].permute(1, 2, 0).numpy()
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_encoder_graph_has_two_cubic_resize_passes(upstream_files, tiny_base, tmp_path):
    import onnx

    from dfosd.core.contracts import Geometry, component_contracts
    from dfosd.core.onestep import build_from_model
    from dfosd.export.onnx_export import export_part

    model = build_from_model(tiny_base, read_model(upstream_files["pisa-sr"], base_spec=TINY))
    contract = component_contracts(Geometry(tile=8, batch=1, vae_scale_factor=tiny_base.vae_scale_factor))["encoder"]
    export_part(model.encoder, contract, tmp_path / "enc.onnx")
    resizes = [n for n in onnx.load(str(tmp_path / "enc.onnx")).graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    for n in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["mode"] == b"cubic" and attrs["cubic_coeff_a"] == pytest.approx(-0.5)
        assert attrs["exclude_outside"] == 1 and attrs["coordinate_transformation_mode"] == b"half_pixel"


class _WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_that_runs_code_is_refused_unopened(tmp_path):
    victim = tmp_path / "pwned.txt"
    bad = tmp_path / "osediff.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"rank_unet": 4, "payload": _WritesFile(victim)}, f)
    with pytest.raises(DfosdError, match="refused and not unpickled"):
        read_model(bad, base_spec=TINY)
    assert not victim.exists()


def test_convert_then_inspect_then_read(upstream_files, tmp_path):
    from dfosd.cli import main

    out = tmp_path / "osediff.safetensors"
    r = CliRunner().invoke(main, ["convert", str(upstream_files["osediff"]), "--out", str(out), "--base", TINY,
                                  "--prompt", PROMPT])
    assert r.exit_code == 0, r.output
    assert "family osediff (dict with unet_lora_encoder" in r.output
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for text in ("family: osediff", "lora unet:", "lora vae:", "replaced whole: unet.conv_in.weight",
                 "timestep 999", "x0 rule ddpm", "pil-bicubic", "colour fix: adain", "posterior mean"):
        assert text in r.output
    direct = read_model(upstream_files["osediff"], base_spec=TINY, prompt=PROMPT)
    again = read_model(out)
    assert again.family.name == "osediff" and again.prompt == PROMPT and again.timestep == 999
    assert torch.equal(again.text_embedding, direct.text_embedding)
    assert [s.header() for s in again.lora_sets] == [s.header() for s in direct.lora_sets]
    for a, b in zip(again.lora_sets, direct.lora_sets):
        assert all(torch.equal(a.factors[m][i], b.factors[m][i]) for m in b.factors for i in (0, 1))
    assert all(torch.equal(again.replacements[k], v) for k, v in direct.replacements.items())
    # a file that is not ours is never overwritten
    foreign = tmp_path / "mine.safetensors"
    foreign.write_bytes(b"not dfosd")
    r = CliRunner().invoke(main, ["convert", str(upstream_files["hypir"]), "--out", str(foreign), "--base", TINY])
    assert r.exit_code != 0 and "not overwriting" in r.output and foreign.read_bytes() == b"not dfosd"


def _merged_unet(model, base):
    import copy

    from dfosd.core.srmodel import merge_into

    unet = copy.deepcopy(base.unet)
    merge_into(model, unet, copy.deepcopy(base.vae))
    return unet.state_dict()


def test_diffusers_and_kohya_layouts_merge_like_peft(upstream_files, tiny_base, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(upstream_files["hypir"], weights_only=True)
    rank = 8
    diffusers = {"unet." + k.replace(".default.", "."): v for k, v in state.items()}
    save_file(diffusers, tmp_path / "diffusers.safetensors", metadata={"lora_alpha": str(rank)})
    modules = {k.split(".lora_")[0] for k in state}
    kohya = {}
    for m in modules:
        stem = "lora_unet_" + m.replace(".", "_")
        kohya[stem + ".lora_down.weight"] = state[f"{m}.lora_A.default.weight"]
        kohya[stem + ".lora_up.weight"] = state[f"{m}.lora_B.default.weight"] * 2  # alpha rank/2 halves it back
        kohya[stem + ".alpha"] = torch.tensor(rank / 2)
    save_file(kohya, tmp_path / "kohya.safetensors")

    with pytest.raises(DfosdError, match="pass --family"):
        read_model(tmp_path / "kohya.safetensors", base_spec=TINY, base=tiny_base)
    want = _merged_unet(read_model(upstream_files["hypir"], base_spec=TINY), tiny_base)
    changed = 0
    for name in ("diffusers", "kohya"):
        model = read_model(tmp_path / f"{name}.safetensors", family="hypir", base_spec=TINY, base=tiny_base)
        got = _merged_unet(model, tiny_base)
        for k, v in want.items():
            assert torch.allclose(got[k], v, atol=1e-6), (name, k)
            changed += not torch.equal(v, tiny_base.unet.state_dict()[k])
    assert changed > 20


def test_not_supported_and_unknown_checkpoints_are_refused_with_reasons(tmp_path):
    s3 = tmp_path / "s3diff.pkl"
    torch.save({"rank_unet": 32, "unet_lora_target_modules": ["to_q"], "state_dict_unet": {},
                "state_dict_unet_de_mlp": {"0.weight": torch.zeros(2, 2)}}, s3)
    with pytest.raises(DfosdError, match="S3Diff modulates its LoRA per image"):
        read_model(s3)
    sd3 = tmp_path / "tsdsr.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8)}, sd3)
    with pytest.raises(DfosdError, match="SD3-medium"):
        read_model(sd3)
    odd = tmp_path / "odd.pth"
    torch.save({"model.layer.weight": torch.zeros(2)}, odd)
    with pytest.raises(DfosdError, match="fit no supported layout"):
        read_model(odd)


def test_broken_checkpoint_lists_every_problem(upstream_files, tiny_base, tmp_path):
    from dfosd.core.srmodel import validate_model

    sd = torch.load(upstream_files["osediff"], weights_only=True)
    keys = sorted(k for k in sd["state_dict_unet"] if ".lora_A." in k)
    sd["state_dict_unet"][keys[0]] = sd["state_dict_unet"][keys[0]][:, :-1]  # wrong shape
    sd["state_dict_unet"]["conv_in.base_layer.weight"] = torch.zeros(3, 3, 3, 3)  # wrong replacement
    bad = tmp_path / "osediff_bad.pkl"
    torch.save(sd, bad)
    model = read_model(bad, base_spec=TINY)
    with pytest.raises(DfosdError) as info:
        validate_model(model, tiny_base)
    msg = str(info.value)
    assert "2 problem(s)" in msg and keys[0].split(".lora_A")[0] in msg and "replacement unet.conv_in.weight" in msg
    del sd["state_dict_unet"][keys[1].replace("lora_A", "lora_B")]
    del sd["state_dict_unet"]["conv_in.base_layer.bias"]
    sd["unet_lora_others_modules"] = sd["unet_lora_others_modules"][1:]
    torch.save(sd, bad)
    with pytest.raises(DfosdError) as info:
        read_model(bad, base_spec=TINY)
    msg = str(info.value)
    assert "3 problem(s)" in msg and "only one of lora_A/lora_B" in msg and "unet.conv_in.bias" in msg
    assert "default_others: the saved module list and the weights disagree" in msg
