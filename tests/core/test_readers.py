"""Checkpoint readers: family detection, safe pickles, diffusers/kohya layouts, refusals, problem
lists; PIL's bicubic as dfosd computes it. Checkpoints written the upstream way (tests/upstream_way.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import upstream_way as uw
from conftest import TINY
from dfosd.core.errors import DfosdError
from dfosd.core.readers import read_model


@pytest.fixture(scope="module", autouse=True)
def _threads(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def upstream_files(tiny_base, osediff_pkl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upstream")
    return {"osediff": osediff_pkl,
            "hypir": uw.write_hypir(folder / "HYPIR_sd2.pth", tiny_base)}


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


def test_refused_families_say_why(upstream_files, tmp_path):
    from safetensors.torch import save_file

    for name, reason in (("invsr", "noise-predictor"), ("adcsr", "pruned"), ("osdface", "from the image")):
        with pytest.raises(DfosdError, match=reason):
            read_model(upstream_files["hypir"], family=name)
    osdface = tmp_path / "osdface"
    osdface.mkdir()
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3)}, osdface / "pytorch_lora_weights.safetensors")
    torch.save({"w": torch.zeros(1)}, osdface / "embedding_change_weights.pth")
    with pytest.raises(DfosdError, match="OSDFace"):
        read_model(osdface / "pytorch_lora_weights.safetensors", family="hypir")
