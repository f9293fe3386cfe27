"""Checkpoints written, and inference run, the way each upstream project does it (tiny size).

Written from the facts cited in core/families.py and the lead's notes (no upstream code copied):
module-selection rules, peft adapter names and LoraConfig (default lora_alpha), the saved
container, the pre-processing, the prompt through tokenizer + text encoder, the x0 rule via
diffusers' DDPMScheduler. The reference keeps the peft adapters UNMERGED, so parity against
it checks dfosd's merge, not dfosd against itself. The one documented deviation kept here too:
the VAE posterior mean instead of a random sample.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

UNET_GREP = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut", "conv_out",
             "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
VAE_GREP = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
HYPIR_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out", "proj_in",
                 "proj_out", "ff.net.2", "ff.net.0.proj"]


def unet_module_groups(unet) -> tuple[list, list, list]:
    """OSEDiff/PiSA-SR rule: parameters (not bias/norm) whose name holds a pattern; the first
    matching pattern files it under down blocks + conv_in, up blocks + conv_out, or the rest."""
    enc, dec, oth = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        if not any(p in name for p in UNET_GREP):
            continue
        module = name.replace(".weight", "")
        if "down_blocks" in name or "conv_in" in name:
            enc.append(module)
        elif "up_blocks" in name or "conv_out" in name:
            dec.append(module)
        else:
            oth.append(module)
    return enc, dec, oth


def vae_encoder_modules(vae) -> list:
    """OSEDiff's VAE rule: encoder weights matching any pattern (once per matching pattern, so
    the list has duplicates) and quant_conv (not post_quant_conv), once per pattern."""
    out = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for p in VAE_GREP:
            if p in name and "encoder" in name:
                out.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                out.append(name.replace(".weight", ""))
    return out


def _randomize(model, select, gen, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if select(name):
                p.copy_(torch.randn(p.shape, generator=gen) * std + (p if "base_layer" in name else 0))


def _add(model, adapters: dict[str, tuple[int, list, dict]]):
    from peft import LoraConfig

    for name, (rank, targets, extra) in adapters.items():
        model.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=targets, **extra),
                          adapter_name=name)
    return model


def write_osediff(path, base, rank=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    unet, vae = copy.deepcopy(base.unet), copy.deepcopy(base.vae)
    enc, dec, oth = unet_module_groups(unet)
    vae_mods = vae_encoder_modules(vae)
    _add(unet, {"default_encoder": (rank, enc, {}), "default_decoder": (rank, dec, {}), "default_others": (rank, oth, {})})
    _add(vae, {"default_encoder": (rank, vae_mods, {})})
    _randomize(unet, lambda n: "lora" in n or "conv_in" in n, gen)
    _randomize(vae, lambda n: "lora" in n, gen)
    sd = {"vae_lora_encoder_modules": vae_mods, "unet_lora_encoder_modules": enc, "unet_lora_decoder_modules": dec,
          "unet_lora_others_modules": oth, "rank_unet": rank, "rank_vae": rank,
          "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
          "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k}}
    torch.save(sd, path)
    return path


def write_pisa(path, base, rank_pix=4, rank_sem=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(base.unet)
    groups = unet_module_groups(unet)
    adapters = {}
    for g, r in (("pix", rank_pix), ("sem", rank_sem)):
        for kind, mods in zip(("encoder", "decoder", "others"), groups):
            adapters[f"default_{kind}_{g}"] = (r, mods, {})
    _add(unet, adapters)
    _randomize(unet, lambda n: "lora" in n, gen, std=0.07)
    sd = {f"unet_lora_{kind}_modules_{g}": mods for g in ("pix", "sem") for kind, mods in
          zip(("encoder", "decoder", "others"), groups)}
    sd.update(lora_rank_unet_pix=rank_pix, lora_rank_unet_sem=rank_sem,
              state_dict_unet={k: v for k, v in unet.state_dict().items() if "lora" in k})
    torch.save(sd, path)
    return path


def hypir_unet(base, rank):
    unet = copy.deepcopy(base.unet)
    return _add(unet, {"default": (rank, HYPIR_TARGETS, {"lora_alpha": rank})})


def write_hypir(path, base, rank=8, seed=2):
    gen = torch.Generator().manual_seed(seed)
    unet = hypir_unet(base, rank)
    _randomize(unet, lambda n: "lora" in n, gen, std=0.1)
    torch.save({k: v for k, v in unet.state_dict().items() if "lora" in k}, path)
    return path


# ---- inference the upstream way ------------------------------------------------------------

def encode_prompt(tokenizer, text_encoder, prompt):
    ids = tokenizer(prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _load_peft(model, sd: dict, adapters: dict, select):
    _add(model, adapters)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if select(n):
                p.copy_(sd[n])
    model.set_adapter(list(adapters))
    return model.eval()


def pil_upscale(lr_uint8: torch.Tensor, scale: int) -> torch.Tensor:
    """PIL resize (default filter: bicubic) of each image, ToTensor, x2-1."""
    from PIL import Image

    out = []
    for img in lr_uint8:
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        big = np.asarray(pil.resize((pil.width * scale, pil.height * scale)))
        out.append(torch.from_numpy(big.copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out) * 2 - 1


def _scheduler(base):
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in base.scheduler_config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(cfg)


def _unet_vae_decode(unet, vae, latent, emb, t, x0):
    with torch.no_grad():
        eps = unet(latent, torch.tensor([t]), encoder_hidden_states=emb.expand(latent.shape[0], -1, -1)).sample
        z0 = x0(eps, latent)
        return vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1)


def run_osediff(path, base, lr_uint8, text_models, prompt=""):
    sd = torch.load(path, weights_only=True)
    unet, vae = copy.deepcopy(base.unet), copy.deepcopy(base.vae)
    r = sd["rank_unet"]
    _load_peft(unet, sd["state_dict_unet"], {"default_encoder": (r, sd["unet_lora_encoder_modules"], {}),
                                             "default_decoder": (r, sd["unet_lora_decoder_modules"], {}),
                                             "default_others": (r, sd["unet_lora_others_modules"], {})},
               lambda n: "lora" in n or "conv_in" in n)
    _load_peft(vae, sd["state_dict_vae"], {"default_encoder": (sd["rank_vae"], sd["vae_lora_encoder_modules"], {})},
               lambda n: "lora" in n)
    sched = _scheduler(base)
    sched.set_timesteps(1)
    # OSEDiff pins diffusers 0.25, where step() at t=999 after set_timesteps(1) takes prev_t =
    # 999 - 1000 = -1 (abar_prev = 1): prev_sample is x0 (+1e-10 noise). Current diffusers looks t
    # up in .timesteps instead; naming 999 there gives the same prev_t = -1.
    sched.timesteps = torch.tensor([999])
    emb = encode_prompt(*text_models, prompt)
    with torch.no_grad():
        latent = vae.encode(pil_upscale(lr_uint8, 4)).latent_dist.mode() * vae.config.scaling_factor
    out = _unet_vae_decode(unet, vae, latent, emb, 999,
                           lambda eps, z: sched.step(eps, 999, z, return_dict=True).prev_sample)
    return (out + 1) * 127.5


def _pisa_models(path, base):
    """PiSA-SR's UNet with its six peft adapters (pix and sem, per block group), left unmerged, and its VAE."""
    sd = torch.load(path, weights_only=True)
    unet, vae = copy.deepcopy(base.unet), copy.deepcopy(base.vae).eval()
    adapters = {}
    for g in ("pix", "sem"):
        for kind in ("encoder", "decoder", "others"):
            adapters[f"default_{kind}_{g}"] = (sd[f"lora_rank_unet_{g}"], sd[f"unet_lora_{kind}_modules_{g}"], {})
    _load_peft(unet, sd["state_dict_unet"], adapters, lambda n: "lora" in n)
    return unet, vae, adapters


def run_pisa(path, base, lr_uint8, text_models, prompt=""):
    unet, vae, adapters = _pisa_models(path, base)
    emb = encode_prompt(*text_models, prompt)
    with torch.no_grad():
        latent = vae.encode(pil_upscale(lr_uint8, 4)).latent_dist.mode() * vae.config.scaling_factor
    out = _unet_vae_decode(unet, vae, latent, emb, 1, lambda eps, z: z - eps)
    return (out + 1) * 127.5


def run_hypir(path, base, lr_uint8, text_models, prompt="", rank=8):
    import torch.nn.functional as F

    state = torch.load(path, weights_only=True)
    unet = hypir_unet(base, rank)
    unet.load_state_dict(state, strict=False)
    unet.eval()
    vae = copy.deepcopy(base.vae).eval()
    sched = _scheduler(base)
    emb = encode_prompt(*text_models, prompt)
    lq = F.interpolate(lr_uint8.float() / 255.0, scale_factor=4, mode="bicubic") * 2 - 1
    with torch.no_grad():
        latent = vae.encode(lq).latent_dist.mode() * vae.config.scaling_factor
    out = _unet_vae_decode(unet, vae, latent, emb, 200,
                           lambda eps, z: sched.step(eps, 200, z).pred_original_sample)
    return (out + 1) * 127.5


def run_pisa_adjustable(path, base, lr_uint8, text_models, scales, prompt=""):
    """PiSA-SR's adjustable mode: eps_pix from the pix adapters alone, eps_sem from pix + sem,
    eps = l_pix * eps_pix + l_sem * (eps_sem - eps_pix), x0 = z - eps."""
    unet, vae, adapters = _pisa_models(path, base)
    emb = encode_prompt(*text_models, prompt)
    with torch.no_grad():
        z = vae.encode(pil_upscale(lr_uint8, 4)).latent_dist.mode() * vae.config.scaling_factor
        t = torch.tensor([1])
        eps_sem = unet(z, t, encoder_hidden_states=emb).sample
        unet.set_adapter([a for a in adapters if a.endswith("_pix")])
        eps_pix = unet(z, t, encoder_hidden_states=emb).sample
        eps = scales[0] * eps_pix + scales[1] * (eps_sem - eps_pix)
        out = vae.decode((z - eps) / vae.config.scaling_factor).sample.clamp(-1, 1)
    return (out + 1) * 127.5


# ---- OMGSR-S (wuer5/OMGSR train/train_omgsr_s.py set_unet_lora / set_vae_encoder_lora, save_pretrained;
#      infer/omgsr_s_infer_model.py: PeftModel.from_pretrained on the UNet and on vae.encoder) ----------

OMGSR_TARGETS = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


def write_omgsr(folder, base, unet_rank=8, vae_rank=4, vae_alpha=None, seed=3):
    """OMGSR-S's release folder: PeftModel(..., adapter_name=...) on the UNet and on vae.encoder, both
    save_pretrained into ``folder`` (peft puts a non-default adapter in a sub-folder of its name).
    Upstream sets lora_alpha = rank; ``vae_alpha`` other than the rank checks the scale is read from the file."""
    from peft import LoraConfig, PeftModel

    gen = torch.Generator().manual_seed(seed)
    for module, rank, alpha, name in ((base.unet, unet_rank, unet_rank, "unet_lora_adapter"),
                                      (base.vae.encoder, vae_rank, vae_alpha or vae_rank, "vae_encoder_lora_adapter")):
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=OMGSR_TARGETS, init_lora_weights="gaussian")
        wrapped = PeftModel(copy.deepcopy(module), cfg, adapter_name=name)
        _randomize(wrapped, lambda n: "lora" in n, gen, std=0.06)
        wrapped.save_pretrained(str(folder))
    return folder


def run_omgsr(folder, base, lr_uint8, text_models, prompt="", timestep=273):
    """OMGSR_S_Infer's untiled path with the adapters left unmerged: PIL resize x4 (LANCZOS to a multiple of
    8 is the identity here), latent x scaling_factor (the mean, not a sample), UNet at the mid timestep,
    x0 = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t) with abar from the base's DDPMScheduler, decode, clamp."""
    from peft import PeftModel

    unet = PeftModel.from_pretrained(copy.deepcopy(base.unet), str(folder / "unet_lora_adapter")).eval()
    vae = copy.deepcopy(base.vae).eval()
    vae.encoder = PeftModel.from_pretrained(vae.encoder, str(folder / "vae_encoder_lora_adapter")).eval()
    abar = _scheduler(base).alphas_cumprod[timestep]
    emb = encode_prompt(*text_models, prompt)
    with torch.no_grad():
        latent = vae.encode(pil_upscale(lr_uint8, 4)).latent_dist.mode() * vae.config.scaling_factor
    out = _unet_vae_decode(unet, vae, latent, emb, timestep,
                           lambda eps, z: (z - (1 - abar).sqrt() * eps) / abar.sqrt())
    return (out + 1) * 127.5
