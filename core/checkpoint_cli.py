"""``dfosd checkpoint``: make a test checkpoint (random LoRA + embedding) for a base.

For the first ten minutes: export, run, serve and bench all need a ``lora.safetensors``;
``dfosd checkpoint random --base synthetic:tiny --out lora.safetensors`` writes one in
seconds (valid format, random weights: its outputs are not super-resolved).
"""

from __future__ import annotations

from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.core.errors import DfosdError


@click.group(name="checkpoint", context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Make DFOSD checkpoints (lora.safetensors) for testing."""


@main.command(name="random", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", default="synthetic:tiny", show_default=True,
              help="Base the checkpoint fits: synthetic:tiny (seconds), synthetic:sd21-base, a diffusers dir, ...")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The .safetensors file to write.")
@click.option("--rank", type=click.IntRange(1), default=4, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="LoRA alpha (merge scale alpha/rank).")
@click.option("--tokens", type=click.IntRange(1, 77), default=8, show_default=True, help="Embedding tokens.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@user_errors
def random_main(base, out, rank, alpha, tokens, seed, force):
    """Write a checkpoint with random LoRA factors and embedding that fits BASE.

    The file has the real format (it exports, runs and serves) but random weights: outputs
    are NOT super-resolved. Use it to try the pipeline before you have a trained checkpoint.
    """
    setup_logging(False)
    path = Path(out)
    # Cheap checks before the base is loaded (that imports torch and diffusers).
    if path.suffix != ".safetensors":
        raise DfosdError(f"--out {path}: a checkpoint is a .safetensors file",
                         hint=f"e.g. --out {path.stem}.safetensors")
    if path.exists() and not force:
        raise DfosdError(f"{path} exists", hint="pass --force to overwrite it, or choose another --out")
    if path.parent.exists() and not path.parent.is_dir():
        raise DfosdError(f"--out {path}: {path.parent} is not a folder")
    from dfosd.core.bases import load_base
    from dfosd.core.checkpoint import write_random_checkpoint

    written = write_random_checkpoint(path, load_base(base), rank=rank, alpha=alpha, tokens=tokens, seed=seed)
    say(f"wrote {written}: random LoRA (rank {rank}, alpha {alpha:g}) + embedding ({tokens} tokens) for {base}; "
        "valid format, random weights (outputs are not super-resolved)")
    say(f"next: dfosd-export --ckpt {written} --out dfosd-engines")
    click.echo(str(written))


if __name__ == "__main__":  # pragma: no cover
    main()
