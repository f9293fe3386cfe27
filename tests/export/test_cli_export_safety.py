"""dfosd-export against a hostile user: never delete or overwrite what dfosd did not
write (item 2), and never export NaN/Inf weights (item 5). Real tiny exports through CliRunner."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from dfosd.export.cli import main as export_main

from conftest import TILE


def _export(ckpt, out, *extra):
    return CliRunner().invoke(export_main, ["--ckpt", str(ckpt), "--precision", "fp32", "--tile", str(TILE),
                                            "--out", str(out), *extra])


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------- 2: --out ownership

def test_a_foreign_non_empty_folder_is_refused_untouched(tiny_ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the user's own model")
    (out / ".hidden.tmp").write_bytes(b"the user's temp file")
    (out / "notes.txt").write_text("keep me")
    before = _files(out)
    r = _export(tiny_ckpt, out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "is not empty and is not a dfosd export" in r.output and "model.onnx" in r.output
    assert "fix: pass a new or empty folder" in r.output
    assert _files(out) == before


def test_re_export_removes_only_what_the_earlier_manifest_lists(tiny_ckpt, tiny_export_fp32, tmp_path):
    out = tmp_path / "eng"
    shutil.copytree(tiny_export_fp32, out)  # an fp32 export with tile batches 1 and 2
    old = json.loads((out / "manifest.json").read_text())
    assert {"unet_b2.onnx", "decoder_b2.onnx"} <= set(old["files"])
    (out / "extra.onnx").write_bytes(b"the user's")  # neither listed nor written by dfosd
    (out / ".extra.onnx.tmp").write_bytes(b"the user's too")
    r = _export(tiny_ckpt, out, "--batch", "1")
    assert r.exit_code == 0, r.output
    assert "removed 3 file(s) of the earlier export" in r.output
    names = {p.name for p in out.iterdir()}
    assert not any(n.endswith("_b2.onnx") for n in names)  # the stale batch-2 set is gone
    assert {"extra.onnx", ".extra.onnx.tmp"} <= names  # what dfosd did not write stays
    assert ".dfosd-export-in-progress.json" not in names and not [n for n in names if "dfosd-tmp" in n]
    new = json.loads((out / "manifest.json").read_text())
    assert new["batches"] == [1] and set(new["files"]) == {n for n in names if n.endswith("_b1.onnx")}


def test_a_killed_export_can_be_rerun_and_a_foreign_file_of_a_planned_name_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "eng"
    out.mkdir()
    # What a kill during the first export leaves: the in-progress record, one part, a staging folder.
    (out / ".dfosd-export-in-progress.json").write_text(json.dumps(
        {"kind": "dfosd-export-in-progress", "files": ["encoder_b1.onnx", "unet_b1.onnx", "decoder_b1.onnx"]}))
    (out / "encoder_b1.onnx").write_bytes(b"half of an export")
    (out / ".unet_b1.dfosd-tmp.abc123").mkdir()
    r = _export(tiny_ckpt, out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["decoder_b1.onnx", "encoder_b1.onnx", "manifest.json",
                                                     "unet_b1.onnx"]
    # a file with a name the export writes, but not written by an export of this folder
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / "unet_b2.onnx").write_bytes(b"the user's")
    r = _export(tiny_ckpt, other, "--batch", "1,2")
    assert r.exit_code == 1 and "holds unet_b2.onnx, which this export would overwrite" in r.output, r.output
    assert (other / "unet_b2.onnx").read_bytes() == b"the user's"
    assert not (other / ".dfosd-export-in-progress.json").exists()


# ----------------------------------------------------------------------------- 5: non-finite weights

def _poisoned(tiny_ckpt, tmp_path, *, tensors=None, meta=None):
    with safe_open(str(tiny_ckpt), "pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for key, fn in (tensors or {}).items():
        t[key] = fn(t[key])
    path = tmp_path / "poisoned.safetensors"
    save_file(t, str(path), metadata={**m, **(meta or {})})
    return path, sorted(t)


def _set(value, index=0):
    def fn(x):
        x = x.clone()
        x.view(-1)[index] = value
        return x
    return fn


def test_export_refuses_nan_and_inf_tensors_naming_them(tiny_ckpt, tmp_path):
    with safe_open(str(tiny_ckpt), "pt") as f:
        lora_b = sorted(k for k in f.keys() if k.endswith("conv1.lora_B.weight"))[0]
    ckpt, _ = _poisoned(tiny_ckpt, tmp_path, tensors={lora_b: _set(float("nan")),
                                                      "text_embedding": _set(float("inf"), 5)})
    r = _export(ckpt, tmp_path / "e")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "2 tensor(s) hold NaN or Inf values" in r.output and lora_b in r.output and "text_embedding" in r.output
    assert not (tmp_path / "e").exists()


def test_export_names_a_lone_lora_factor_without_a_traceback(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    with safe_open(str(tiny_ckpt), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tiny_ckpt))
    lone = sorted(k for k in tensors if k.endswith("conv1.lora_B.weight"))[0]
    del tensors[lone]
    save_file(tensors, str(tmp_path / "half.safetensors"), metadata=meta)
    r = _export(tmp_path / "half.safetensors", tmp_path / "e")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "has lora_A but no lora_B" in r.output and lone.removeprefix("unet.").removesuffix(".lora_B.weight") in r.output
    assert not (tmp_path / "e").exists()


def test_export_refuses_nan_lora_alpha(tiny_ckpt, tmp_path):
    ckpt, _ = _poisoned(tiny_ckpt, tmp_path, meta={"lora_alpha": "nan"})
    r = _export(ckpt, tmp_path / "e")
    assert r.exit_code == 1 and "lora_alpha nan must be a finite number > 0" in r.output


def test_export_refuses_merged_weights_that_overflow(tiny_ckpt, tmp_path):
    with safe_open(str(tiny_ckpt), "pt") as f:
        a = sorted(k for k in f.keys() if k.endswith("to_v.lora_A.weight"))[0]
    b = a.replace("lora_A", "lora_B")
    big = lambda x: torch.full_like(x, 3e19)  # noqa: E731 - finite factors; B @ A * alpha/rank overflows float32
    ckpt, _ = _poisoned(tiny_ckpt, tmp_path, tensors={a: big, b: big})
    r = _export(ckpt, tmp_path / "e")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    module = a[len("unet."):-len(".lora_A.weight")]
    assert f"merging the LoRA gives NaN or Inf in 1 weight(s): unet.{module}.weight" in r.output
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_read_checkpoint_names_the_bad_tensor(tiny_ckpt, tmp_path, value):
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.errors import DfosdError

    ckpt, _ = _poisoned(tiny_ckpt, tmp_path, tensors={"text_embedding": _set(value)})
    with pytest.raises(DfosdError, match="1 tensor\\(s\\) hold NaN or Inf values: text_embedding"):
        read_checkpoint(ckpt)


def test_every_family_s_model_is_checked_for_non_finite_values(tiny_base, tiny_ckpt):
    """The check on the export path of every family (format 2, upstream files), not only format 1's reader."""
    import dataclasses

    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.errors import DfosdError
    from dfosd.core.srmodel import from_format1, validate_model

    model = from_format1(read_checkpoint(tiny_ckpt))
    lora = model.lora_sets[0]
    name, (a, b) = sorted(lora.factors.items())[0]
    bad_a = a.clone()
    bad_a.view(-1)[0] = float("nan")
    factors = {**lora.factors, name: (bad_a, b)}
    bad = dataclasses.replace(model, lora_sets=(dataclasses.replace(lora, factors=factors),) + model.lora_sets[1:])
    with pytest.raises(DfosdError, match=rf"1 tensor\(s\) hold NaN or Inf values: unet\.\w+: {name}\.lora_A"):
        validate_model(bad, tiny_base)
    with pytest.raises(DfosdError, match="alpha nan must be positive"):
        dataclasses.replace(lora, alpha=float("nan"))
