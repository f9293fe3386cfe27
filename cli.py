"""``dfosd``: one command group over the pipeline's stages."""

from __future__ import annotations

import click


class LazyGroup(click.Group):
    """Subcommands import their stage only when run, so ``dfosd --help`` loads no torch."""

    _commands = {
        "checkpoint": ("dfosd.core.checkpoint_cli", "main", "Make a test checkpoint: dfosd checkpoint random --out F."),
        "export": ("dfosd.export.cli", "main", "Export a checkpoint to ONNX (and engines)."),
        "run": ("dfosd.runtime.cli", "main", "Upscale images with exported engines."),
        "bench": ("dfosd.bench.cli", "main", "Compare eager PyTorch with the engines."),
        "convert": ("dfosd.export.convert_cli", "convert_main",
                    "Convert osediff.pkl / pisa_sr.pkl / HYPIR_sd2.pth / a LoRA into one dfosd model file."),
        "inspect": ("dfosd.export.convert_cli", "inspect_main", "Show a checkpoint's family, LoRA and what export bakes."),
        "build": ("dfosd.engines.build_cli", "main",
                  "Build what a backend runs (TensorRT plans, OpenVINO blobs, AOTI packages) from an export."),
        "aoti-export": ("dfosd.engines.aoti_cli", "main", "Deprecated: dfosd build DIR --backend aoti."),
        "parity": ("dfosd.bench.parity_cli", "main", "PSNR/max error of exports vs eager fp32 on held-out photos."),
        "train": ("dfosd.training.cli", "main", "Train a DFOSD checkpoint (LoRA + embedding) on HR photos."),
        "triton-repo": ("dfosd.serving.cli", "triton_repo_main", "Write a Triton model repository from an export."),
        "demo": ("dfosd.bench.demo", "main", "Synthetic checkpoint -> export -> upscale photos -> latency."),
        "verify": ("dfosd.bench.verify", "main", "TensorRT parser check + Polygraphy comparison of each part."),
        "gpu-bench": ("dfosd.bench.gpu_bench", "main", "GPU benchmark: eager, torch.compile, AOTI, onnxruntime, tiled."),
    }

    def list_commands(self, ctx):
        return list(self._commands)

    def get_command(self, ctx, name):
        import importlib

        if name not in self._commands:
            return None
        module, attr, _ = self._commands[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in self._commands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dfosd")
def main():
    """dfosd: DFOSD one-step diffusion x4 super-resolution, compiled for deployment."""


if __name__ == "__main__":  # pragma: no cover
    main()
