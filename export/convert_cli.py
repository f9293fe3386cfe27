"""``dfosd convert`` (any supported checkpoint -> dfosd format 2) and ``dfosd inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dfosd.core.cli_support import say, setup_logging, user_errors
from dfosd.core.vocab import FAMILY_NAMES, REFUSED_FAMILY_NAMES

FAMILY_CHOICES = list(FAMILY_NAMES + REFUSED_FAMILY_NAMES)  # the refused ones answer with the reason


@click.command(name="convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="The format-2 model file to write (.safetensors).")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), default=None,
              help="Override the family detected from the keys.")
@click.option("--base", default=None,
              help="Base whose tokenizer + text encoder encode the prompt (and whose UNet names kohya keys). "
                   "[default: stabilityai/stable-diffusion-2-1-base]")
@click.option("--prompt", default=None, help="Prompt encoded once into the model [default: the family's, empty].")
@click.option("--timestep", default=None, type=click.IntRange(0, 999),
              help="Replace the family's fixed timestep (e.g. OMGSR-S 273); recorded as a deviation.")
@click.option("--force", is_flag=True, help="Overwrite --out even if it is not a format-2 file dfosd convert wrote.")
@click.option("-v", "--verbose", is_flag=True)
@user_errors
def convert_main(src, out, family, base, prompt, timestep, force, verbose):
    """Convert SRC (osediff.pkl, pisa_sr.pkl, HYPIR_sd2.pth, an OMGSR-S or PEFT adapter folder, a diffusers/kohya
    LoRA, dfosd format 1) into one
    safe dfosd format-2 file that every later command reads."""
    setup_logging(verbose)
    from dfosd.core.bases import load_base
    from dfosd.core.errors import DfosdError
    from dfosd.core.readers import read_model, with_encoded_prompt
    from dfosd.core.srmodel import validate_model, write_model

    out_path = Path(out)
    if out_path.suffix != ".safetensors":
        raise DfosdError(f"--out {out}: give a .safetensors file name")
    if out_path.exists() and out_path.resolve() == Path(src).resolve():
        raise DfosdError(f"--out {out} is the file being converted; not overwriting it",
                         hint="choose another --out")
    if out_path.exists() and not force and not _is_converted_file(out_path):
        raise DfosdError(f"{out} exists and is not a file dfosd convert wrote (dfosd format 2); not overwriting it",
                         hint="choose another --out, or pass --force")
    # the checks dfosd-export makes, in its order: the file's own, then against the base it names
    model = read_model(src, family=family, base_spec=base, prompt=prompt, progress=say, encode=False)
    if timestep is not None:
        model = model.with_timestep(timestep)
    say(f"loading base {base or model.base_model} to check the model fits it (as dfosd-export does)")
    base_model = load_base(base or model.base_model)
    model = with_encoded_prompt(model, say)
    validate_model(model, base_model)
    write_model(out_path, model)
    say(f"wrote {out} (dfosd format 2, family {model.family.name}, {len(model.lora_sets)} LoRA set(s), "
        f"{len(model.replacements)} replaced tensor(s))")
    click.echo(str(out_path))


def _is_converted_file(path: Path) -> bool:
    """A format-2 file: what convert writes. A format-1 file is a trained checkpoint (dfosd-train's
    output): not convert's to replace."""
    from dfosd.core.readers import safetensors_metadata
    from dfosd.core.srmodel import FORMAT_VERSION

    return safetensors_metadata(path).get("dfosd_format") == FORMAT_VERSION


@click.command(name="inspect", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path())
@click.option("--family", type=click.Choice(FAMILY_CHOICES), default=None,
              help="Override the family detected from the keys.")
@click.option("--base", default=None, help="Base for prompt encoding of upstream files (as convert).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@user_errors
def inspect_main(file, family, base, as_json):
    """Print FILE's family, ranks, adapted layers and parameters per part, and what export will bake.

    FILE may also be an export directory: its parts, precisions and fp16 islands (the nodes kept
    in fp32 and the measured peaks that put them there)."""
    setup_logging(False)
    from dfosd.core.vocab import MANIFEST_NAME

    if Path(file).is_dir() and (Path(file) / MANIFEST_NAME).is_file():  # other folders: PEFT adapter checkpoints
        click.echo(_export_lines(Path(file), as_json))
        return
    from dfosd.core.readers import read_model
    from dfosd.core.resshift_reader import describe_unet_file

    resshift = describe_unet_file(file) if Path(file).is_file() else None
    if resshift is not None:  # the second backbone: described, not an SD-family model
        click.echo("\n".join(resshift))
        return
    model = read_model(file, family=family, base_spec=base, progress=say, encode=False)  # no text encoder needed
    info = model.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    lines = [f"file: {file}", f"family: {info['family']} ({info['title']})", f"upstream: {info['upstream']}",
             f"base: {info['base_model']}"]
    for part, p in info["lora"].items():
        lines.append(f"lora {part}: {p['layers']} layers, {p['parameters']:,} parameters")
        for s in p["sets"]:
            lines.append(f"  set {s['name']} (group {s['group']}): rank {s['rank']}, alpha {s['alpha']:g}, "
                         f"scale {s['scale']:g}, {s['layers']} layers")
    for key, shape in info["replaced"].items():
        lines.append(f"replaced whole: {key} {shape}")
    prompt = "learned embedding" if info["prompt"] is None else f"prompt {info['prompt']!r}"
    shape = info["embedding_shape"] or "(encoded by the base's text encoder at convert/export)"
    lines += [f"bakes: timestep {info['timestep']}, x0 rule {info['x0_rule']}, conditioning {prompt} "
              f"{shape}, pre-processing {info['preprocess']}, x{info['upscale']}",
              f"default colour fix: {info['color_fix']}"]
    lines += ["deviations from upstream inference:"] + [f"  - {d}" for d in info["deviations"]] if info["deviations"] \
        else []
    click.echo("\n".join(lines))


def _export_lines(folder: Path, as_json: bool) -> str:
    from dfosd.core.manifest import ExportDir
    from dfosd.export.fp16_islands import summary

    export = ExportDir(folder, check="none")  # reading, not running: no hashes
    parts = {stem: {"precision": e.get("precision"), "fp16_islands": e.get("fp16_islands"),
                    "fp16_compute": e.get("fp16_compute"), "fp16_range": e.get("fp16_range")}
             for stem, e in export.components.items()}
    if as_json:
        return json.dumps({"export_dir": str(export.path), "precision": export.precision, "parts": parts}, indent=2)
    lines = [f"export: {export.path} ({export.precision}, tile {export.tile}, batches {export.batches})"]
    for stem, p in parts.items():
        if p["fp16_islands"] is None:
            lines.append(f"{stem}: {p['precision']}" + (" (exported before fp16 islands were measured)"
                                                        if p["precision"] == "fp16" else ""))
            continue
        lines.append(summary(stem, p["fp16_islands"], p["fp16_compute"]))
        for i in p["fp16_islands"]:
            what = "|w|" if i["reason"] == "weight" else "|x|"
            peak = f"{what} {i['peak']:.3g} at {i['tensor']}" if i["peak"] is not None else "the base asks for it"
            lines.append(f"  fp32: {i['node']} ({i['op']}, {i['reason']}: {peak})")
    return "\n".join(lines)
