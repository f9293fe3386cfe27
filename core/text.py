"""A base's CLIP tokenizer and text encoder, used once at export to turn a prompt into the
constant conditioning of prompt families (OSEDiff, PiSA-SR, HYPIR).

Encoded the way those projects do it: tokenizer(prompt, max_length=model_max_length,
padding="max_length", truncation=True) and the text encoder's ``last_hidden_state``
(output [0]), shape [1, 77, width].

Synthetic bases have no downloadable tokenizer: they get a byte-level CLIP tokenizer built
here (every byte one token, no merges, CLIP's special tokens) and a text encoder of the
configured shape with seeded random weights. Nothing is fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dfosd.core.bases import CONFIG_ROOT, SYNTHETIC_CONFIGS, SYNTHETIC_PREFIX, SYNTHETIC_SEED
from dfosd.core.errors import DfosdError

if TYPE_CHECKING:
    import torch

MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The byte -> printable character table of byte-level BPE (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def synthetic_tokenizer():
    """A CLIP tokenizer over single bytes: 512 byte tokens (with and without end-of-word), then
    <|startoftext|> (512) and <|endoftext|> (513, also padding)."""
    import tempfile

    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    # files, not in-memory dicts: the one constructor signature transformers 4.x and 5.x share
    with tempfile.TemporaryDirectory(prefix="dfosd-tok-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=MAX_LENGTH)


def synthetic_text_encoder(name: str):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((CONFIG_ROOT / SYNTHETIC_CONFIGS[name] / "text_encoder.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SYNTHETIC_SEED + 1)
        model = CLIPTextModel(CLIPTextConfig(**cfg))
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def load_text_models(base_spec: str):
    """(tokenizer, text encoder) of a base spec."""
    if base_spec.startswith(SYNTHETIC_PREFIX):
        name = base_spec[len(SYNTHETIC_PREFIX):]
        if name not in SYNTHETIC_CONFIGS:
            raise DfosdError(f"unknown synthetic base {base_spec!r}")
        return synthetic_tokenizer(), synthetic_text_encoder(name)
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(base_spec).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base_spec, allow_patterns=["tokenizer/*", "text_encoder/*"]))
        except Exception as exc:
            raise DfosdError(f"could not get the tokenizer and text encoder of {base_spec!r}: {type(exc).__name__}",
                             hint="pass --base a local SD-2.1-base folder holding tokenizer/ and text_encoder/") from exc
    missing = [d for d in ("tokenizer", "text_encoder") if not (folder / d).is_dir()]
    if missing:
        raise DfosdError(f"base {folder} has no {' or '.join(missing)}/ folder; a prompt family needs both",
                         hint="use a full diffusers snapshot of SD-2.1-base")
    return (CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval())


def encode_prompt(base_spec: str, prompt: str) -> "torch.Tensor":
    """[1, 77, width] fp32: the prompt through the base's tokenizer and text encoder."""
    import torch

    tokenizer, encoder = load_text_models(base_spec)
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        out = encoder(ids)[0].float()
    del encoder
    return out.contiguous()
