"""Train `builtin:demo-sd15`, its demo LoRA and its demo upscaler from scratch, on two CPU cores.

    PYTHONPATH=$PWD python tools/train_demo.py --out imagegen/data/demo

The data are drawn on the fly by `imagegen.demo_scenes` (one flat shape on a flat background,
32x32, with captions like "a small red circle at the top left on a blue background"; its module
docstring documents the generator and the held-out pairs). Six stages (`--stages`, in this
order), each seeded from `--seed`, each saving its weights to `--out` when it ends; a later
stage reads the earlier ones back from `--out` (float16, as shipped), so a run of all stages
and a run of one stage at a time train on exactly the same inputs:

1. `vae`: an AutoencoderKL with two blocks (2x down: 32x32x3 -> 16x16x8), `recon_loss` (MSE +
   0.5 L1 + an L1 of pixel differences, weighted up near the shape) + a small KL, 40% of its
   scenes drawn with the LoRA's white outline (so the latents can hold it); then its
   `scaling_factor` is set to 1 / std of the latents.
2. `sr`, the demo upscaler (needs nothing else): SRVGGNetCompact x4
   (imagegen.upscale.archs.compact, 32 features, 8 convs) on 32 -> 128 pairs of the same scenes (the 32 px input sometimes blurred
   a little, like a VAE decode), 16 px crops around the shape, MSE + 0.1 L1; saved as a BasicSR
   `{"params_ema": ...}` .pth.
3. `text`, the text encoder alone: a 2-layer, 64-wide CLIPTextModel (the real 49408-token
   vocabulary and tokenizer) with linear heads that read the caption's colour, shape,
   background, size and position back from its hidden states (`train_text`); only the caption
   words' embedding rows are trained. It is frozen from then on: the UNet's conditioning is
   informative from its first step.
4. `unet`: a 3-level UNet2DConditionModel (16x16, 8x8, 4x4; attention on the two inner levels)
   on the frozen text encoder; epsilon prediction on the standard SD1.5 noise schedule (the
   engine's scheduler config), the MSE weighted as the v-prediction loss (1 + 1/SNR, clipped at
   200: the high-noise steps, where the caption decides the picture, count), offset noise 0.1,
   lr 2e-3 on a cosine schedule of `unet_steps`, EMA 0.995. Scenes come from a `LatentPool`
   (drawn and encoded ahead, each used about four times). Every `probe_every` steps the EMA
   weights render 64 fixed training captions (10 DPM++ steps, guidance 5) that
   `demo_scenes.read_scene` grades; the best-graded weights are the ones saved, and the stage
   ends early once colour, shape and position all read >= `UNET_STOP` (the shipped UNet, and
   the one a whole run made on 2026-12-03: the probe's best, step 6500 of 8000).
5. `lora`, the demo LoRA: rank 8 on every attention and feed-forward Linear and on the resnet
   convs of the two outer levels of the frozen UNet, trained on the same captions with the
   scene drawn with a white outline (its own `LatentPool`); saved in the diffusers/peft key layout
   (`unet.<module>.lora_A.weight` / `lora_B.weight`).
6. `decoder`: more steps on the VAE decoder alone, with an edge term in the loss, the encoder
   frozen and saved back bit for bit, so the latent space stages 4-5 learnt stays as it was.

With `--threads 2` (the default), `sr` starts at once in a second process on one thread at nice
19 (it gets the few cycles the 2-thread stages leave idle, then a core once `lora` is done) and
`decoder` runs beside `lora`, one thread each; nothing reads what they write. On the 2-core
development machine one whole run took 45.5 min on 2026-12-03 (README, "The demo model").
`--minutes` (default 60) is a wall-clock budget for the run: when the UNet's step rate, measured
at step `probe_every` and at every probe after it, says the stage and `lora` after it would end
past it, the UNet's cosine schedule is shortened to the steps that fit (and logged); a faster
machine runs the full schedule and gets the same weights with or without it.

Weights are stored as float16 safetensors (the builtin loader casts them back to float32) to
keep the package small. `--scale` multiplies every stage's step count (0.05 for a pilot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagegen import demo_scenes as ds  # noqa: E402

SIDE = 32  # image side the model is trained at (and renders by default)
STAGES = ("vae", "sr", "text", "unet", "lora", "decoder")
DEFAULTS = {
    "vae_steps": 3000,  # batch 16
    "unet_steps": 8000,  # batch 32 (the cosine schedule's length; see UNET_STOP)
    "lora_steps": 600,  # batch 32
    "sr_steps": 6000,  # batch 16 crops of 16 -> 64
    "decoder_steps": 1500,  # batch 16
    "text_steps": 400,  # batch 64 captions
    "probe_every": 500,  # in-training probe (and checkpoint choice)
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 8,  # 2x down, 2x2x3 pixels -> 8 numbers: the outline and a star's points survive
    "norm_num_groups": 16,
    "sample_size": SIDE,
    "scaling_factor": 1.0,  # set after stage 1
}
TEXT_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
    "projection_dim": 64,
}
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": SIDE // 2,
    "in_channels": 8,
    "out_channels": 8,
    "block_out_channels": [32, 64, 96],
    # attention at 8x8 and 4x4 only (at 16x16 it costs 3x the step for little)
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
    "use_linear_projection": True,
}
VAE_LR = 2e-3
DECODER_EDGE = 1.0
SHAPE_WEIGHT = 4.0  # extra loss weight near the shape (`shape_weight`)
VAE_OUTLINED = 0.4  # fraction of VAE training scenes drawn with the LoRA's outline (so it can be decoded)
TEXT_LR = 3e-3
UNET_LR = 2e-3
UNET_EMA = 0.995
UNET_STOP = 0.97  # the UNet stage ends early once every probe figure reaches this
# what `lora` (with `decoder` beside it) costs per LoRA step, in UNet training steps: measured
# 2026-12-03, 600 LoRA steps took 318 s while a UNet step took 0.22 s (2.4); used to keep the
# time the `--minutes` budget leaves for `lora` when it shortens the UNet's schedule
LORA_COST = 2.5
MIN_SNR = 5.0
LOSS_WEIGHTING = "v"
V_CLIP = 200.0
SR_KWARGS = {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 32, "num_conv": 8, "scale": 4}
LORA_RANK = 8
LORA_LR = 5e-3
# resnet convs of the UNet's two outer levels (the outline is a local, high-resolution mark)
LORA_CONV_TARGETS = tuple(f"{b}.{i}.resnets.{j}.{c}" for b, i, n in (("down_blocks", 0, 1), ("down_blocks", 1, 1), ("up_blocks", 1, 2), ("up_blocks", 2, 2))
                          for j in range(n) for c in ("conv1", "conv2"))  # fmt: skip
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def init_args(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def batch_images(rng: np.random.Generator, n: int, *, outline: bool | float = False, side: int = SIDE):
    """n random training scenes and their drawings in [-1, 1]; `outline` True draws every one with
    the LoRA's white outline, a float the fraction drawn with it (chosen at random)."""
    scenes = [ds.random_scene(rng) for _ in range(n)]
    marks = [bool(outline) if isinstance(outline, bool) else bool(rng.random() < outline) for _ in scenes]
    imgs = np.stack([np.asarray(ds.draw(s, side, outline=m), dtype=np.float32) for s, m in zip(scenes, marks)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2) / 127.5 - 1
    return scenes, x


def save_half(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    atomic(path, lambda tmp: save_file(sd, str(tmp)))


def atomic(path: Path, write) -> None:
    """`write(tmp)` then rename to `path`: a stage that reads `path` while another writes it (they
    run side by side) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


# --- stages 1 and 6: VAE and its decoder -------------------------------------------------


def train_vae(out: Path, steps: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**init_args(VAE_CONFIG))
    with torch.no_grad():  # start with a near-zero latent variance: the decoder sees a clean code
        vae.encoder.conv_out.bias[VAE_CONFIG["latent_channels"] :] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = VAE_LR * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        _, x = batch_images(rng, 16, outline=VAE_OUTLINED)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = recon_loss(y, x)
        loss = rec + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"vae {step}/{steps} rec {rec.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        _, x = batch_images(np.random.default_rng(seed + 99), 256)
        z = vae.encode(x).latent_dist.mean
        sf = float(1.0 / z.std())
        shift = float(z.mean())
    vae.register_to_config(scaling_factor=sf)
    cfg = dict(VAE_CONFIG, scaling_factor=sf)
    (out / "vae").mkdir(parents=True, exist_ok=True)
    (out / "vae" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_half(vae, out / "vae" / "diffusion_pytorch_model.safetensors")
    log(f"vae saved: scaling_factor {sf:.4f} (latent mean {shift:.3f})")
    return vae


def shape_weight(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) loss weight: 1 on the flat background, 1 + SHAPE_WEIGHT within 2 pixels of
    the shape (pixels away from the border's median colour). A small star covers 3% of the
    picture: unweighted, the loss barely sees its points."""
    b = x.shape[0]
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)  # (B, 3, 4W)
    bg = border.median(-1).values.view(b, 3, 1, 1)
    near = ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
    near = torch.nn.functional.max_pool2d(near, 5, stride=1, padding=2)
    return 1 + SHAPE_WEIGHT * near


def recon_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE + 0.5 L1, plus DECODER_EDGE x L1 of the horizontal and vertical pixel differences
    (sharp corners, star points and the LoRA's outline are what a blurry decoder loses), each
    weighted by `shape_weight`."""
    w = shape_weight(x)
    d = y - x
    loss = (w * (d.pow(2) + 0.5 * d.abs())).mean()
    if DECODER_EDGE:
        gx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
        gy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
        loss = loss + DECODER_EDGE * ((w[..., :, 1:] * gx.abs()).mean() + (w[..., 1:, :] * gy.abs()).mean())
    return loss


def train_decoder(out: Path, steps: int, seed: int) -> None:
    """Stage 6: more training for the VAE decoder alone (`recon_loss`, with its edge term). The
    encoder (so the latent space the UNet and LoRA were trained on) is frozen and saved back bit
    for bit."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = load(out, "vae")
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = 1e-3 * min(1.0, step / 30) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        _, x = batch_images(rng, 16, outline=VAE_OUTLINED)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        y = vae.decode(z).sample
        rec = recon_loss(y, x)
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"decoder {step}/{steps} rec {rec.item():.4f} ({time.time() - t0:.0f}s)")
    save_half(vae, out / "vae" / "diffusion_pytorch_model.safetensors")
    log("vae decoder saved")


# --- stages 3 and 4: text encoder, then UNet ----------------------------------------------


class Tokens:
    """Caption -> input ids (77, padded as the pipeline pads), cached."""

    def __init__(self) -> None:
        from transformers import CLIPTokenizer

        self.tok = CLIPTokenizer.from_pretrained(str(ROOT / "imagegen" / "data" / "clip-tokenizer"))
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


def noise_schedule():
    from diffusers import DDPMScheduler

    cfg = json.loads((ROOT / "imagegen" / "data" / "configs" / "sd15" / "scheduler" / "scheduler_config.json").read_text())
    return DDPMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                         beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"])  # fmt: skip


def caption_labels(scene: ds.Scene | None, caption: str) -> list[int]:
    """What a caption says, as class indices for the text encoder's auxiliary heads (the last
    index of each head = "not said")."""
    if not caption:
        return [len(ds.COLOURS), len(ds.SHAPES), len(ds.COLOURS), len(ds.SIZES), len(ds.POSITIONS)]
    assert scene is not None
    sizes, positions = list(ds.SIZES), list(ds.POSITIONS)
    return [ds.COLOURS.index(scene.colour), ds.SHAPES.index(scene.shape),
            ds.COLOURS.index(scene.background) if f"on a {scene.background} background" in caption else len(ds.COLOURS),
            sizes.index(scene.size) if caption.startswith(f"a {scene.size} ") else len(sizes),
            positions.index(scene.position) if f" {scene.position}" in caption else len(positions)]  # fmt: skip


HEADS = (len(ds.COLOURS) + 1, len(ds.SHAPES) + 1, len(ds.COLOURS) + 1, len(ds.SIZES) + 1, len(ds.POSITIONS) + 1)


def caption_vocab(tokens: "Tokens") -> list[int]:
    """Every token id a training caption can contain (BOS, EOS and the words of `demo_scenes`)."""
    words = ["a", "on a", "background", *ds.COLOURS, *ds.SHAPES, *ds.SIZES, *ds.POSITIONS]
    ids = {49406, 49407}
    for w in words:
        ids.update(tokens.tok(w).input_ids)
    return sorted(ids)


def train_text(out: Path, steps: int, seed: int) -> None:
    """Stage 3: the text encoder alone, before the UNet sees it. Linear heads read, from the
    mean of the last hidden states and from every padding position (causal attention: each sees
    the whole caption), the caption's colour, shape, background, size and position ("not said"
    included); cross-entropy on all of them. So the conditioning is informative from the UNet's
    first step, and factorised (a held-out colour/shape pair reads as its two parts). Only the
    embedding rows of the caption vocabulary are trained (no weight decay); the others keep their
    small random init."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    te = CLIPTextModel(CLIPTextConfig(**init_args(TEXT_CONFIG)))
    tokens = Tokens()
    vocab = caption_vocab(tokens)
    emb = te.get_input_embeddings()
    emb.weight.requires_grad_(False)
    remap = torch.zeros(emb.weight.shape[0], dtype=torch.long)
    remap[torch.tensor(vocab)] = torch.arange(len(vocab))
    rows = torch.nn.Parameter(emb.weight[vocab].clone())
    hook = emb.register_forward_hook(lambda m, inp, o: rows[remap[inp[0]]])
    heads = torch.nn.Linear(TEXT_CONFIG["hidden_size"], sum(HEADS))
    body = [p for n, p in te.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": body + list(heads.parameters()), "weight_decay": 0.01},
                             {"params": [rows], "weight_decay": 0.0}], lr=TEXT_LR)  # fmt: skip
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = TEXT_LR * min(1.0, step / 30) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = [ds.random_scene(rng) for _ in range(64)]
        caps = [ds.random_caption(s, rng) for s in scenes]
        ids = tokens(caps)
        y = torch.tensor([caption_labels(s, c) for s, c in zip(scenes, caps)])
        h = te(ids)[0]  # (B, 77, D)
        first_eos = (ids == 49407).int().argmax(1)
        pad = torch.arange(ids.shape[1])[None] >= first_eos[:, None]  # (B, 77)
        logits = heads(torch.cat([h.mean(1, keepdim=True), h], 1)).split(HEADS, -1)  # each (B, 78, k)
        weight = torch.cat([torch.ones(len(caps), 1), pad.float() / pad.sum(1, keepdim=True)], 1)  # mean 1/2, pads 1/2
        loss, acc = 0.0, []
        for k, lg in enumerate(logits):
            ce = torch.nn.functional.cross_entropy(lg.transpose(1, 2), y[:, k, None].expand(-1, lg.shape[1]), reduction="none")
            loss = loss + (ce * weight).sum() / (2 * len(caps))
            acc.append((lg[:, 0].argmax(-1) == y[:, k]).float().mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps:
            log(f"text {step}/{steps} loss {loss.item():.4f} acc {' '.join(f'{a:.2f}' for a in acc)} ({time.time() - t0:.0f}s)")
    hook.remove()
    with torch.no_grad():
        emb.weight[vocab] = rows
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    (out / "text_encoder" / "config.json").write_text(json.dumps(TEXT_CONFIG, indent=2) + "\n")
    save_half(te, out / "text_encoder" / "model.safetensors")
    log(f"text encoder saved ({len(vocab)} caption tokens trained)")


class LatentPool:
    """Training scenes drawn and VAE-encoded ahead of the step that uses them: `size` of them at
    a time (their captions and posterior mean and std); every step takes a random batch from the
    pool (a fresh caption, latent sample, noise and timestep each time), and every
    `refresh_every` steps the oldest `refresh` are replaced by new scenes. Each scene is used
    about four times; the VAE encodes in batches of 256 instead of 32 per step (the encode was about
    15% of a UNet step)."""

    def __init__(self, vae, rng: np.random.Generator, *, outline: bool = False, size: int = 4096,
                 refresh: int = 256, refresh_every: int = 32) -> None:  # fmt: skip
        self.vae, self.rng, self.outline = vae, rng, outline
        self.refresh, self.refresh_every = refresh, refresh_every
        self.scenes: list[ds.Scene] = []
        means, stds = [], []
        for _ in range(0, size, refresh):
            sc, m, sd = self._draw(refresh)
            self.scenes += sc
            means.append(m)
            stds.append(sd)
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.next, self.steps = 0, 0

    @torch.no_grad()
    def _draw(self, n: int):
        scenes, x = batch_images(self.rng, n, outline=self.outline)
        post = self.vae.encode(x).latent_dist
        return scenes, post.mean, post.std

    def batch(self, n: int):
        """(scenes, latents scaled by the VAE's scaling_factor) for one training step."""
        self.steps += 1
        if self.steps % self.refresh_every == 0:
            sc, m, sd = self._draw(self.refresh)
            i = self.next
            self.scenes[i : i + self.refresh] = sc
            self.mean[i : i + self.refresh], self.std[i : i + self.refresh] = m, sd
            self.next = (i + self.refresh) % len(self.scenes)
        idx = torch.from_numpy(self.rng.integers(len(self.scenes), size=n))
        z = self.mean[idx] + self.std[idx] * torch.randn_like(self.mean[idx])
        return [self.scenes[int(i)] for i in idx], z * self.vae.config.scaling_factor


class Contexts:
    """The frozen text encoder's hidden states for captions, each caption encoded once (a few
    tens of thousands of distinct captions, 20 kB each; encoding them every step was 4% of a
    UNet step)."""

    def __init__(self, te, tokens: "Tokens") -> None:
        self.te, self.tokens, self.known = te, tokens, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.known]
        if new:
            self.known.update(zip(new, self.te(self.tokens(new))[0]))
        return torch.stack([self.known[c] for c in captions])


def diffusion_loss(unet, contexts: Contexts, pool: LatentPool, sched, rng, *, batch: int = 32):
    """Epsilon loss weighted by `loss_weight`, offset noise 0.1; the text encoder frozen."""
    scenes, z = pool.batch(batch)
    ctx = contexts([ds.random_caption(s, rng) for s in scenes])
    noise = torch.randn_like(z) + 0.1 * torch.randn(z.shape[0], z.shape[1], 1, 1)
    t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],))
    zt = sched.add_noise(z, noise, t)
    pred = unet(zt, t, ctx).sample
    ac = sched.alphas_cumprod[t]
    w = loss_weight(ac)
    return ((pred - noise).pow(2).mean((1, 2, 3)) * w).mean()


def loss_weight(ac: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the epsilon MSE at noise level `ac` (alphas_cumprod)."""
    snr = ac / (1 - ac)
    if LOSS_WEIGHTING == "min-snr":
        return torch.clamp(snr, max=MIN_SNR) / snr
    if LOSS_WEIGHTING == "v":  # the v-prediction loss (1 + 1/snr), clipped
        return torch.clamp(1 + 1 / snr, max=V_CLIP)
    return torch.ones_like(ac)


def probe_scenes(n: int = 64) -> list[ds.Scene]:
    """Fixed training-distribution scenes (never the held-out pairs) for the in-training probe."""
    rng = np.random.default_rng(4242)
    return [ds.random_scene(rng) for _ in range(n)]


@torch.no_grad()
def sample(unet, te, vae, tokens, captions: list[str], seed: int, *, steps: int = 10, cfg: float = 5.0) -> np.ndarray:
    """DPM++ 2M Karras (as the engine runs it) at 32x32: uint8 images (B, 32, 32, 3)."""
    from diffusers import DPMSolverMultistepScheduler

    cfgd = json.loads((ROOT / "imagegen" / "data" / "configs" / "sd15" / "scheduler" / "scheduler_config.json").read_text())
    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=cfgd["beta_start"], beta_end=cfgd["beta_end"],
                                      beta_schedule=cfgd["beta_schedule"], use_karras_sigmas=True, steps_offset=1)  # fmt: skip
    sch.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    n = UNET_CONFIG["sample_size"]
    z = torch.randn(len(captions), UNET_CONFIG["in_channels"], n, n, generator=g) * sch.init_noise_sigma
    ctx = te(tokens(captions + [""] * len(captions)))[0]
    for t in sch.timesteps:
        e = unet(torch.cat([z, z]), t, ctx).sample
        ec, eu = e.chunk(2)
        z = sch.step(eu + cfg * (ec - eu), t, z).prev_sample
    x = vae.decode(z / vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()


def probe(unet, te, vae, tokens) -> dict[str, float]:
    """Fraction of probe scenes whose render reads back right (colour+background, shape, position)."""
    scenes = probe_scenes()
    imgs = sample(unet, te, vae, tokens, [s.caption() for s in scenes], seed=0)
    got = [ds.read_scene(im) for im in imgs]
    return {"colour": float(np.mean([r.colour == s.colour and r.background == s.background for r, s in zip(got, scenes)])),
            "shape": float(np.mean([r.shape == s.shape for r, s in zip(got, scenes)])),
            "position": float(np.mean([r.position == s.position for r, s in zip(got, scenes)]))}  # fmt: skip


def fit_steps(steps: int, step: int, elapsed: float, left: float) -> int:
    """The schedule length that ends within `left` seconds, `step` of `steps` done in `elapsed`
    seconds: `steps` when it fits, else the steps that fit (never fewer than `step`)."""
    if step <= 0 or elapsed <= 0:
        return steps
    return max(step, min(steps, step + int(left * step / elapsed)))


def train_unet(out: Path, vae, te, steps: int, seed: int, probe_every: int, *,
               deadline: float | None = None, reserve_steps: float = 0.0):  # fmt: skip
    """Stage 4: the UNet on the frozen text encoder; EMA (UNET_EMA) weights probed every
    `probe_every` steps, the best probe score saved. With a `deadline` (time.time()), the cosine
    schedule is shortened at the first check (`probe_every` steps, or an eighth of a short run)
    and at every probe after it, so that the stage, and `reserve_steps` UNet steps' worth of
    time after it, end by then; it never grows back."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet = UNet2DConditionModel(**init_args(UNET_CONFIG))
    ema = UNet2DConditionModel(**init_args(UNET_CONFIG))
    ema.load_state_dict(unet.state_dict())
    for m in (ema, te, vae):
        m.requires_grad_(False).eval()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=0.01, fused=True)
    sched, tokens, pool = noise_schedule(), Tokens(), LatentPool(vae, rng)
    contexts = Contexts(te, tokens)
    ema_params = list(ema.parameters())
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "unet" / "config.json").write_text(json.dumps(UNET_CONFIG, indent=2) + "\n")
    t0, avg, best = time.time(), None, -1.0
    check = min(probe_every, max(1, steps // 8))
    step = 0
    while step < steps:
        step += 1
        lr = UNET_LR * min(1.0, step / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = diffusion_loss(unet, contexts, pool, sched, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(UNET_EMA, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0 or step == steps:
            log(f"unet {step}/{steps} loss {avg:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if deadline is not None and check <= step < steps and (step == check or step % probe_every == 0):
            now = time.time()
            elapsed = now - t0
            fit = fit_steps(steps, step, elapsed, deadline - now - reserve_steps * elapsed / step)
            if fit < steps:
                log(f"unet {step}: at {elapsed / step:.2f} s/step the --minutes budget leaves room for {fit} steps:"
                    f" the cosine schedule now ends there (was {steps})")  # fmt: skip
                steps = fit
        if step % probe_every == 0 or step == steps:
            p = probe(ema, te, vae, tokens)
            score = sum(p.values())
            log(f"unet {step} probe colour {p['colour']:.2f} shape {p['shape']:.2f} position {p['position']:.2f}"
                + (" (best: saved)" if score > best else ""))  # fmt: skip
            if score > best:
                best = score
                save_half(ema, out / "unet" / "diffusion_pytorch_model.safetensors")
            if min(p.values()) >= UNET_STOP and step < steps:
                log(f"unet {step}: every probe figure >= {UNET_STOP:g}: stopping early")
                break
    return load(out, "unet")


# --- stage 5: demo LoRA -------------------------------------------------------------------


class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1 / rank)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class LoraConv(torch.nn.Module):
    """peft's Conv2d LoRA: down = a conv like the base one to `rank` channels, up = 1x1."""

    def __init__(self, base: torch.nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        torch.nn.init.normal_(self.down.weight, std=1 / (rank * base.kernel_size[0]))
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def train_lora(out: Path, unet, te, vae, steps: int, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    wrapped: dict[str, LoraLinear | LoraConv] = {}
    for name, mod in list(unet.named_modules()):
        for attr, child in list(mod.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, torch.nn.Linear) and any(full.endswith(t) for t in LORA_TARGETS) and "attentions" in full:
                wrapped[full] = LoraLinear(child, LORA_RANK)
            elif isinstance(child, torch.nn.Conv2d) and any(full.endswith(t) for t in LORA_CONV_TARGETS):
                wrapped[full] = LoraConv(child, LORA_RANK)
            else:
                continue
            setattr(mod, attr, wrapped[full])
    params = [p for w in wrapped.values() for p in (w.down.weight, w.up.weight)]
    opt = torch.optim.AdamW(params, lr=LORA_LR, weight_decay=0.0, fused=True)
    sched, pool = noise_schedule(), LatentPool(vae, rng, outline=True)
    contexts = Contexts(te, Tokens())
    t0, avg = time.time(), None
    for step in range(1, steps + 1):
        lr = LORA_LR * min(1.0, step / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = diffusion_loss(unet, contexts, pool, sched, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            log(f"lora {step}/{steps} loss {avg:.4f} ({time.time() - t0:.0f}s)")
    sd = {}
    for full, w in wrapped.items():
        sd[f"unet.{full}.lora_A.weight"] = w.down.weight.detach().to(torch.float16).contiguous()
        sd[f"unet.{full}.lora_B.weight"] = w.up.weight.detach().to(torch.float16).contiguous()
    meta = {"format": "pt", "imagegen_demo": "white outline"}
    atomic(out / "demo-outline.safetensors", lambda tmp: save_file(sd, str(tmp), metadata=meta))
    # put the plain modules back, for anything that runs after
    for name, mod in list(unet.named_modules()):
        for attr, child in list(mod.named_children()):
            if isinstance(child, (LoraLinear, LoraConv)):
                setattr(mod, attr, child.base)
    log(f"lora saved: {len(wrapped)} layers, rank {LORA_RANK}")


# --- stage 2: demo upscaler ---------------------------------------------------------------


def sr_pairs(rng: np.random.Generator, n: int):
    """n (low, high, centre) triples: the scene at 32 and 128 px (the low one a bicubic or box
    reduction, a quarter of the time blurred a little, like a VAE decode) and the shape's centre in
    low-resolution pixels."""
    from PIL import ImageFilter

    lo, hi, centres = [], [], []
    for _ in range(n):
        s = ds.random_scene(rng)
        h = ds.draw(s, SIDE * 4, outline=bool(rng.random() < 0.3))
        low = h.resize((SIDE, SIDE), resample=3 if rng.random() < 0.5 else 4)  # bicubic or box
        if rng.random() < 0.25:
            low = low.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.6))))
        lo.append(np.asarray(low, dtype=np.float32) / 255)
        hi.append(np.asarray(h, dtype=np.float32) / 255)
        col, row = ds.POSITIONS[s.position]
        centres.append(((ds.CELL_CENTRES[row] + s.dy) * SIDE, (ds.CELL_CENTRES[col] + s.dx) * SIDE))
    return (torch.from_numpy(np.stack(lo)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(hi)).permute(0, 3, 1, 2),
            np.array(centres))  # fmt: skip


def train_sr(out: Path, steps: int, seed: int) -> None:
    """16x16 low-resolution crops around the shape (flat background teaches nothing), MSE + L1."""
    from imagegen.upscale.archs.compact.net import SRVGGNetCompact

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SRVGGNetCompact(**SR_KWARGS)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    pool_lo, pool_hi, centres = sr_pairs(rng, 1200)
    c = 16  # crop side, low-resolution pixels
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = 2e-3 * min(1.0, step / 30) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        los, his = [], []
        for i in rng.integers(0, len(pool_lo), 16):
            cy, cx = centres[i] + rng.uniform(-6, 6, 2)
            oy = int(np.clip(round(cy) - c // 2, 0, SIDE - c))
            ox = int(np.clip(round(cx) - c // 2, 0, SIDE - c))
            los.append(pool_lo[i, :, oy : oy + c, ox : ox + c])
            his.append(pool_hi[i, :, 4 * oy : 4 * (oy + c), 4 * ox : 4 * (ox + c)])
        lo, hi = torch.stack(los), torch.stack(his)
        if rng.random() < 0.5:
            lo, hi = lo.flip(-1), hi.flip(-1)
        d = net(lo) - hi
        loss = d.pow(2).mean() + 0.1 * d.abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"sr {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f}s)")
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic(out / "demo-x4.pth", lambda tmp: torch.save({"params_ema": sd}, str(tmp)))
    log("upscaler saved")


def side_stage(a: argparse.Namespace, stage: str, nice: int = 0) -> subprocess.Popen:
    """`stage` in a second process on one thread, beside this one (at CPU priority `nice`)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(a.out), "--seed", str(a.seed),
           "--scale", str(a.scale), "--stages", stage, "--threads", "1"]  # fmt: skip
    log(f"{stage}: started beside, in a second process (one thread, nice {nice})")
    return subprocess.Popen(cmd, preexec_fn=(lambda: os.nice(nice)) if nice else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "imagegen" / "data" / "demo")
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list; later stages load earlier ones from --out")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads to use; with 2 or more, `sr` runs from the start in a second "
                         "process (one thread, nice 19) and `decoder` beside `lora` (one thread each)")  # fmt: skip
    ap.add_argument("--minutes", type=float, default=60.0,
                    help="wall-clock budget for the whole run (0: none); on a machine too slow for it the "
                         "UNet's cosine schedule is shortened to the steps that fit, keeping time for `lora`")  # fmt: skip
    a = ap.parse_args()
    if not a.minutes >= 0:
        ap.error(f"--minutes: must be 0 (no budget) or more, not {a.minutes:g}")
    stages = a.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown stage {unknown[0]!r} (one of {', '.join(STAGES)})")
    from diffusers.utils import logging as dl

    dl.set_verbosity_error()
    n = {k: max(1, int(v * a.scale)) for k, v in DEFAULTS.items() if k != "probe_every"}
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    a.deadline = t0 + 60 * a.minutes if a.minutes else None
    # `sr` needs nothing and `decoder` only the VAE (whose encoder it keeps bit for bit), and no
    # other stage reads what they write, so with two or more threads they run beside the others,
    # in processes on one thread: `sr` from the start at nice 19 (it takes the few cycles the
    # 2-thread stages leave idle, and the rest once `lora` is done), `decoder` beside `lora`
    # (both on one thread: two multi-threaded processes on two cores stall each other). Each
    # stage reads the earlier ones back from --out (float16, as shipped), so which process runs
    # a stage changes nothing.
    beside = a.threads >= 2 and any(s not in ("sr", "decoder") for s in stages)
    side: list[tuple[str, subprocess.Popen]] = []
    try:
        run_stages(a, stages, n, beside, side)
    except BaseException:
        for _, proc in side:
            proc.kill()
        raise
    for name, proc in side:
        if proc.wait() != 0:
            sys.exit(f"train_demo: the `{name}` stage failed (exit code {proc.returncode})")
    log(f"done in {time.time() - t0:.0f}s")


def run_stages(a: argparse.Namespace, stages: list[str], n: dict[str, int], beside: bool, side: list) -> None:
    """The stages of `stages` in order; with `beside`, `sr` and `decoder` in processes of their
    own, appended to `side`."""
    if "sr" in stages and beside:
        side.append(("sr", side_stage(a, "sr", nice=19)))
    if "vae" in stages:
        train_vae(a.out, n["vae_steps"], a.seed)
    if "text" in stages:
        train_text(a.out, n["text_steps"], a.seed + 5)
    if "unet" in stages:
        reserve = LORA_COST * n["lora_steps"] if "lora" in stages else 0.0
        train_unet(a.out, load(a.out, "vae"), load(a.out, "text_encoder"), n["unet_steps"], a.seed + 1,
                   DEFAULTS["probe_every"], deadline=a.deadline, reserve_steps=reserve)  # fmt: skip
    if "lora" in stages:  # loaded before `decoder` starts; the LoRA only encodes anyway
        unet, te, vae = load(a.out, "unet"), load(a.out, "text_encoder"), load(a.out, "vae").requires_grad_(False)
    if "decoder" in stages:
        if beside:
            side.append(("decoder", side_stage(a, "decoder")))
            torch.set_num_threads(1)
        else:
            train_decoder(a.out, n["decoder_steps"], a.seed + 4)
    if "lora" in stages:
        train_lora(a.out, unet, te, vae, n["lora_steps"], a.seed + 2)
    if "sr" in stages and not beside:
        train_sr(a.out, n["sr_steps"], a.seed + 3)


def load(out: Path, part: str):
    """A trained part back from `out` (float32)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = json.loads((out / part / "config.json").read_text())
    if part == "vae":
        m, f = AutoencoderKL(**init_args(cfg)), "diffusion_pytorch_model.safetensors"
    elif part == "unet":
        m, f = UNet2DConditionModel(**init_args(cfg)), "diffusion_pytorch_model.safetensors"
    else:
        m, f = CLIPTextModel(CLIPTextConfig(**init_args(cfg))), "model.safetensors"
    m.load_state_dict({k: v.float() for k, v in load_file(str(out / part / f)).items()})
    return m.eval()


if __name__ == "__main__":
    main()
