"""``dfosd-train``: light --help, config files (TOML/YAML, unknown keys, overrides), user errors, a real run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from dfosd.core.errors import DfosdError
from dfosd.training.cli import main
from dfosd.training.config import build_config, read_config_file

from conftest import TINY

skd = pytest.importorskip("skimage.data")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skd, name)()).save(d / f"{name}.png")
    return d


def _invoke(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def _assert_user_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in result.output, result.output


TINY_ARGS = ["--base", TINY, "--crop", "64", "--batch-size", "2", "--rank", "4", "--alpha", "4",
             "--embedding-tokens", "4", "--no-progress"]


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("module,args", [("dfosd.training.cli", []), ("dfosd.cli", ["train"])])
def test_help_does_not_import_torch(module, args):
    probe = (f"import importlib, sys\nfrom click.testing import CliRunner\n"
             f"r = CliRunner().invoke(importlib.import_module({module!r}).main, {args!r} + ['--help'])\n"
             f"assert r.exit_code == 0 and '--dump-pairs' in r.output, r.output\n"
             f"print('HEAVY=' + ','.join(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


# ---------------------------------------------------------------- configuration


def test_toml_file_then_flags_override(tmp_path):
    f = tmp_path / "train.toml"
    f.write_text('base = "synthetic:tiny"\ndata = "photos"\nout = "a.safetensors"\nsteps = 5\n'
                 'batch-size = 4\nlr = 1\ndump_pairs = [3, "pairs"]\n')
    cfg = build_config({"steps": 7, "rank": None}, f)
    assert (cfg.steps, cfg.batch_size, cfg.rank, cfg.lr, cfg.dump_pairs) == (7, 4, 16, 1.0, (3, "pairs"))
    assert isinstance(cfg.lr, float)


def test_yaml_file(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    f = tmp_path / "train.yaml"
    f.write_text("data: photos\nout: b.safetensors\nlambda_adv: 0.5\ngradient-checkpointing: true\n")
    cfg = build_config({}, f)
    assert cfg.lambda_adv == 0.5 and cfg.gradient_checkpointing is True
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(DfosdError, match="PyYAML is not installed"):
        read_config_file(f)


def test_config_file_errors(tmp_path, photo_dir):
    f = tmp_path / "bad.toml"
    f.write_text(f'data = "{photo_dir}"\nstep = 3\nlearning_rate = 1e-4\n')
    r = _invoke(["--config", f])
    _assert_user_error(r, str(f), "'step'", "'learning_rate'", "known keys")
    f.write_text('data = "d"\nout = "o.safetensors"\nsteps = 0\nlr = -1.0\ncrop = "big"\n')
    r = _invoke(["--config", f])
    _assert_user_error(r, "3 problem(s)", "steps = 0 must be >= 1", "lr = -1.0", "crop = 'big': expected an integer")
    f.write_text("data = [unclosed\n")
    _assert_user_error(_invoke(["--config", f]), "is not valid TOML")
    j = tmp_path / "train.json"
    j.write_text("{}")
    _assert_user_error(_invoke(["--config", j]), "use .toml, .yaml or .yml")
    _assert_user_error(_invoke(["--config", tmp_path / "missing.toml"]), "does not exist")


def test_flag_errors_are_listed_together(photo_dir):
    r = _invoke(["--data", photo_dir, "--out", "x.pt", "--batch-size", "3", "--grad-accum", "2",
                 "--device", "cpu", "--mixed-precision", "bf16"])
    _assert_user_error(r, "must end with .safetensors", "not divisible by grad_accum", "needs a CUDA device")
    _assert_user_error(_invoke(["--out", "a.safetensors"]), "data is required")


# ---------------------------------------------------------------- data and perceptual weights


def test_empty_and_all_bad_data_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_invoke(["--data", empty, "--out", tmp_path / "a.safetensors", *TINY_ARGS]),
                       "has no image files")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    _assert_user_error(_invoke(["--data", bad, "--out", tmp_path / "a.safetensors", *TINY_ARGS]),
                       "2 image file(s), none readable")
    _assert_user_error(_invoke(["--data", tmp_path / "nope", "--out", tmp_path / "a.safetensors"]),
                       "does not exist")
    assert not (tmp_path / "a.safetensors").exists()


def test_missing_dists_weights_name_both_options(photo_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no VGG16 in the hub cache
    r = _invoke(["--data", photo_dir, "--out", tmp_path / "a.safetensors", *TINY_ARGS, "--perceptual", "dists"])
    _assert_user_error(r, "--perceptual-weights PATH", "--perceptual none")
    r = _invoke(["--data", photo_dir, "--out", tmp_path / "a.safetensors", *TINY_ARGS,
                 "--perceptual-weights", tmp_path / "no.safetensors"])
    _assert_user_error(r, "does not exist", "--perceptual none")


def test_dump_pairs(photo_dir, tmp_path):
    from PIL import Image

    r = _invoke(["--data", photo_dir, "--crop", "64", "--dump-pairs", "2", tmp_path / "pairs"])
    assert r.exit_code == 0, r.output
    lr = sorted((tmp_path / "pairs" / "lr").iterdir())
    hr = sorted((tmp_path / "pairs" / "hr").iterdir())
    assert [p.name for p in lr] == [p.name for p in hr] == ["00000.png", "00001.png"]
    assert Image.open(lr[0]).size == (16, 16) and Image.open(hr[0]).size == (64, 64)


# ---------------------------------------------------------------- a real run


def test_train_from_a_config_file_with_overrides(photo_dir, tmp_path):
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import read_checkpoint
    from dfosd.core.readers import read_model
    from dfosd.core.srmodel import validate_model

    f = tmp_path / "train.toml"
    f.write_text(f'base = "{TINY}"\ndata = "{photo_dir}"\nsteps = 50\ncrop = 64\nbatch_size = 2\nrank = 4\n'
                 'alpha = 4\nembedding_tokens = 4\nperceptual = "none"\nsave_every = 0\nsample_every = 0\n')
    out = tmp_path / "out" / "lora.safetensors"
    r = _invoke(["--config", f, "--steps", "2", "--out", out, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "trained 2 step(s)" in r.output
    ckpt = read_checkpoint(out)
    validate_model(read_model(out), load_base(TINY))
    assert ckpt.metadata.extra["dfosd_train_step"] == "2" and ckpt.text_embedding.shape[1] == 4
    assert (tmp_path / "out" / "lora-train" / "train_log.csv").read_text().count("\n") == 3  # header + 2 steps
    r = _invoke(["--config", f, "--steps", "3", "--out", out, "--no-progress", "--resume",
                 tmp_path / "out" / "lora-train"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and read_checkpoint(out).metadata.extra["dfosd_train_step"] == "3"
    r = _invoke(["--config", f, "--steps", "3", "--rank", "8", "--out", out, "--resume", tmp_path / "out"])
    _assert_user_error(r, "no state-NNNNNNN.pt")  # out/ itself holds no states
    r = _invoke(["--config", f, "--steps", "3", "--rank", "8", "--out", out,
                 "--resume", tmp_path / "out" / "lora-train"])
    _assert_user_error(r, "cannot resume", "rank: saved run 4, now 8")
