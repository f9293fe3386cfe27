"""``dfosd-train``: HR photos -> DFOSD ``lora.safetensors`` (also ``dfosd train``).

Only click and the torch-free config module are imported at the top: ``--help`` and
configuration errors never load torch.
"""

from __future__ import annotations

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.training.config import MIXED_PRECISION_CHOICES, PERCEPTUAL_CHOICES, TrainConfig

_D = TrainConfig.__dataclass_fields__


def _default(name: str) -> str:
    return f" [default: {_D[name].default}]"


@click.command(name="train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML or YAML file with any of these settings (keys = flag names); flags override it.")
@click.option("--base", default=None,
              help="Base: diffusers dir, hub id, single file, synthetic:tiny or synthetic:sd21-base." + _default("base"))
@click.option("--data", default=None, type=click.Path(file_okay=False), help="Folder of HR images (recursive).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="The lora.safetensors to write.")
@click.option("--steps", type=int, default=None, help="Optimizer updates." + _default("steps"))
@click.option("--batch-size", type=int, default=None,
              help="Images per update, over all processes and accumulation micro-steps." + _default("batch_size"))
@click.option("--grad-accum", type=int, default=None, help="Micro-steps per update." + _default("grad_accum"))
@click.option("--lr", type=float, default=None, help="AdamW learning rate, G and D." + _default("lr"))
@click.option("--lr-warmup", type=int, default=None, help="Linear warm-up steps (0: constant)." + _default("lr_warmup"))
@click.option("--rank", type=int, default=None, help="LoRA rank (generator UNet and discriminator)." + _default("rank"))
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank)." + _default("alpha"))
@click.option("--timestep", type=int, default=None, help="The fixed one-step timestep T." + _default("timestep"))
@click.option("--embedding-tokens", type=int, default=None,
              help="Tokens N of the learned embedding [1, N, cross_attention_dim]." + _default("embedding_tokens"))
@click.option("--lambda-adv", type=float, default=None,
              help="Weight of the noise-aware discriminator's G loss (0: no D)." + _default("lambda_adv"))
@click.option("--lambda-eadists", type=float, default=None, help="Weight of EA-DISTS." + _default("lambda_eadists"))
@click.option("--perceptual", type=click.Choice(PERCEPTUAL_CHOICES), default=None,
              help="dists: EA-DISTS (needs DISTS weights); none: MSE + adversarial only." + _default("perceptual"))
@click.option("--perceptual-weights", type=click.Path(dir_okay=False), default=None,
              help="DISTS weights file (VGG16 features + alpha/beta). Default: DISTS_pytorch + torch hub VGG16.")
@click.option("--seed", type=int, default=None, help="Fixes data order, crops, degradations, init." + _default("seed"))
@click.option("--resume", default=None, type=click.Path(),
              help="Training state file, or a --log-dir (its newest state): continue that run.")
@click.option("--crop", type=int, default=None, help="HR crop size in pixels (LR = crop/4)." + _default("crop"))
@click.option("--save-every", type=int, default=None,
              help="Training-state interval in steps (0: at the end only)." + _default("save_every"))
@click.option("--keep-states", type=int, default=None, help="Newest states kept." + _default("keep_states"))
@click.option("--sample-every", type=int, default=None,
              help="Sample SR image interval in steps (0: never)." + _default("sample_every"))
@click.option("--log-dir", default=None, type=click.Path(file_okay=False),
              help="States, train_log.csv, samples/. [default: <out without .safetensors>-train]")
@click.option("--dump-pairs", nargs=2, type=(int, click.Path(file_okay=False)), default=None, metavar="N DIR",
              help="Write N degraded LR/HR pairs from --data to DIR/lr, DIR/hr and exit.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N." + _default("device"))
@click.option("--mixed-precision", type=click.Choice(MIXED_PRECISION_CHOICES), default=None,
              help="Autocast on CUDA (auto: bf16 where supported, else fp16); CPU runs fp32." +
                   _default("mixed_precision"))
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute UNet and VAE-decoder activations: less memory, more time. [default: off]")
@click.option("--num-workers", type=int, default=None, help="DataLoader workers. [default: 0 on CPU, 4 on CUDA]")
@click.option("--progress/--no-progress", default=None, help="Progress bar with the losses. [default: on]")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def main(config_file, verbose, **flags):
    """Train a DFOSD checkpoint: LoRA + learned embedding on a frozen SD-2.1-base, one step at fixed T.

    Losses: MSE + lambda_eadists * EA-DISTS + lambda_adv * non-saturating GAN loss from a
    noise-aware discriminator, alternating G and D updates. Several GPUs:
    `accelerate launch --num_processes N -m dfosd.training.cli ...` (data parallel).
    """
    setup_logging(verbose)
    from dfosd.training.config import build_config

    cfg = build_config(flags, config_file)
    from dfosd.training.trainer import train  # torch, diffusers: only now

    result = train(cfg, say=say)
    if cfg.dump_pairs is not None:
        n, out_dir = cfg.dump_pairs
        say(f"wrote {n} LR/HR pairs to {out_dir}/lr and {out_dir}/hr")
        click.echo(out_dir)
    elif result.out is not None:  # the main process
        per_step = result.seconds / max(1, len(result.history))
        say(f"trained {len(result.history)} step(s) in {result.seconds:.1f} s ({per_step:.2f} s/step)")
        click.echo(str(result.out))


if __name__ == "__main__":  # pragma: no cover
    main()
