"""Checkpoint spec: round trip, validation errors listing every problem, LoRA merge."""

import pytest
import torch
from safetensors.torch import save_file

from dfosd.core.checkpoint import (
    CheckpointMetadata,
    random_lora,
    read_checkpoint,
    write_checkpoint,
)
from dfosd.core.errors import DfosdError
from dfosd.core.srmodel import from_format1, merge_into, validate_model


def validate_checkpoint(ckpt, base):
    """A format-1 checkpoint checked against a base as export checks it."""
    validate_model(from_format1(ckpt), base)


def _meta(**kw):
    base = dict(base_model="synthetic:tiny", timestep=999, lora_rank=4, lora_alpha=4.0)
    base.update(kw)
    return CheckpointMetadata(**base)


def test_round_trip_keeps_tensors_and_metadata(tiny_base, tmp_path):
    lora, emb = random_lora(tiny_base, rank=4, tokens=5)
    path = write_checkpoint(tmp_path / "lora.safetensors", lora=lora, text_embedding=emb,
                            metadata=_meta(timestep=500, lora_alpha=8))
    ck = read_checkpoint(path)
    assert ck.metadata.timestep == 500 and ck.metadata.lora_scale == 2.0
    assert set(ck.lora) == set(lora)
    assert torch.equal(ck.text_embedding, emb)
    assert len(ck.sha256) == 64
    validate_checkpoint(ck, tiny_base)
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temp file"


def test_lora_names_use_peft_unet_prefix(tiny_ckpt):
    from safetensors import safe_open

    with safe_open(str(tiny_ckpt), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    lora_keys = [k for k in keys if k != "text_embedding"]
    assert lora_keys and all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                             for k in lora_keys)
    assert any(".conv1." in k for k in lora_keys) and any(".to_q." in k for k in lora_keys)
    assert meta["dfosd_format"] == "1" and meta["vae_latent"] == "mean" and meta["upscale"] == "4"


def test_every_problem_is_listed_at_once(tiny_base, tmp_path):
    lora, emb = random_lora(tiny_base, rank=4)
    name = next(k for k in lora if k.endswith("to_q.lora_A.weight"))
    lora[name] = torch.zeros(4, 7)  # wrong shape
    lora["down_blocks.9.fake.lora_A.weight"] = torch.zeros(4, 4)  # unknown module
    lora["down_blocks.9.fake.lora_B.weight"] = torch.zeros(4, 4)
    half = next(k for k in lora if k.endswith("conv2.lora_B.weight"))
    del lora[half]  # A without B
    bad_emb = torch.zeros(1, 3, 99)  # wrong width
    path = write_checkpoint(tmp_path / "bad.safetensors", lora=lora, text_embedding=bad_emb, metadata=_meta())
    with pytest.raises(DfosdError) as exc:
        validate_checkpoint(read_checkpoint(path), tiny_base)
    msg = str(exc.value)
    assert "do not fit the base" in msg and "no such module" in msg and "has lora_A but no lora_B" in msg
    assert "cross_attention_dim is 32" in msg and str(path) in msg
    assert "4 problem(s)" in msg


def test_missing_metadata_and_stray_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"text_embedding": torch.zeros(1, 2, 32), "vae.foo": torch.zeros(1)}, str(path),
              metadata={"dfosd_format": "1", "timestep": "abc"})
    with pytest.raises(DfosdError) as exc:
        read_checkpoint(path)
    msg = str(exc.value)
    assert "missing metadata: base_model" in msg and "unexpected tensor" in msg and "vae.foo" in msg


@pytest.mark.parametrize("content,expect", [(b"", "not a readable safetensors"),
                                            (b"\x80\x04garbage", "not a readable safetensors")])
def test_unreadable_files(tmp_path, content, expect):
    p = tmp_path / "lora.safetensors"
    p.write_bytes(content)
    with pytest.raises(DfosdError, match=expect):
        read_checkpoint(p)


def test_pickle_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "lora.ckpt").write_bytes(b"x")
    with pytest.raises(DfosdError, match="not a .safetensors"):
        read_checkpoint(tmp_path / "lora.ckpt")
    with pytest.raises(DfosdError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.safetensors")


def test_metadata_validation():
    with pytest.raises(DfosdError, match="timestep 1000"):
        _meta(timestep=1000)
    with pytest.raises(DfosdError, match="vae_latent"):
        _meta(vae_latent="sample")


def test_merge_matches_peft_forward(tiny_base):
    """Merged weights equal running the same LoRA through PEFT (Linear and Conv layers)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    from dfosd.core.checkpoint import DfosdCheckpoint

    lora, emb = random_lora(tiny_base, rank=4, alpha=8, lora_std=0.1)
    ck = DfosdCheckpoint(lora=lora, text_embedding=emb, metadata=_meta(lora_alpha=8))
    merged = copy.deepcopy(tiny_base.unet)
    merge_into(from_format1(ck), merged, None)  # export's merge
    peft_unet = copy.deepcopy(tiny_base.unet)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), peft_unet)
    set_peft_model_state_dict(peft_unet, lora)
    assert set(get_peft_model_state_dict(peft_unet)) == set(lora)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = merged(z, 999, encoder_hidden_states=emb).sample
        b = peft_unet(z, 999, encoder_hidden_states=emb).sample
        base_out = tiny_base.unet(z, 999, encoder_hidden_states=emb).sample
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - base_out).abs().max() > 1e-3, "the LoRA must change the UNet"


# ----------------------------------------------------------------------------- non-finite, umask

def test_nan_lora_alpha_in_metadata_is_refused(tiny_base, tmp_path):
    lora, emb = random_lora(tiny_base, rank=4)
    path = write_checkpoint(tmp_path / "a.safetensors", lora=lora, text_embedding=emb, metadata=_meta())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for bad in ("nan", "inf", "-inf"):  # "nan" passed "alpha <= 0"
        save_file(tensors, str(path), metadata={**meta, "lora_alpha": bad})
        with pytest.raises(DfosdError, match=r"lora_alpha .* must be a finite number > 0"):
            read_checkpoint(path)
    with pytest.raises(DfosdError, match="finite"):
        _meta(lora_alpha=float("nan"))


def test_non_finite_tensors_are_refused_by_name(tiny_base, tmp_path):
    lora, emb = random_lora(tiny_base, rank=4)
    names = sorted(k for k in lora if k.endswith("to_q.lora_B.weight"))[:2]
    lora[names[0]][0, 0] = float("nan")
    lora[names[1]][1, 1] = float("inf")
    emb[0, 0, 0] = float("-inf")
    path = write_checkpoint(tmp_path / "nan.safetensors", lora=lora, text_embedding=emb, metadata=_meta())
    with pytest.raises(DfosdError) as exc:
        read_checkpoint(path)
    msg = str(exc.value)
    assert "3 tensor(s) hold NaN or Inf values" in msg and "text_embedding" in msg
    assert all(f"unet.{n}" in msg for n in names)


def test_merge_refuses_a_weight_that_overflows(tiny_base):
    import copy

    from dfosd.core.checkpoint import DfosdCheckpoint

    lora, emb = random_lora(tiny_base, rank=4)
    name = sorted(k for k in lora if k.endswith("to_k.lora_A.weight"))[0]
    lora[name] = torch.full_like(lora[name], 1e30)  # finite factors, B @ A beyond float32
    lora[name.replace("lora_A", "lora_B")] = torch.full_like(lora[name.replace("lora_A", "lora_B")], 1e30)
    ck = DfosdCheckpoint(lora=lora, text_embedding=emb, metadata=_meta())
    with pytest.raises(DfosdError) as exc:
        merge_into(from_format1(ck), copy.deepcopy(tiny_base.unet), None)
    module = name[: -len(".lora_A.weight")]
    assert f"NaN or Inf in 1 weight(s): unet.{module}.weight" in str(exc.value)


def test_files_get_the_users_umask(tiny_base, tmp_path):
    import os

    from dfosd.core.manifest import write_json_atomic
    from dfosd.training.state import save_state

    lora, emb = random_lora(tiny_base, rank=4)
    for mask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            written = [write_checkpoint(tmp_path / f"l{mask}.safetensors", lora=lora, text_embedding=emb,
                                        metadata=_meta()),
                       save_state(tmp_path / f"s{mask}" / "state.pt", {"step": 1}),  # training resume state
                       tmp_path / f"m{mask}.json"]
            write_json_atomic(written[-1], {})
        finally:
            os.umask(old)
        assert [p.stat().st_mode & 0o777 for p in written] == [mode] * 3, oct(mask)
