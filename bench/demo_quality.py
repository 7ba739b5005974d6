"""How well `builtin:demo-sd15`, its demo LoRA and its demo upscaler do what they are asked.

    PYTHONPATH=$PWD python bench/demo_quality.py [--seeds 16] [--lora-seeds N] [--steps 20] [--guidance 5] [--out PNG]
                                                 [--weights DIR]

On held-out captions (a (colour, shape) pair never drawn in training, `demo_scenes.HELD_OUT`,
each with its own background, size and position), `--seeds` seeds each, through the real engine
(`open_engine`, DPM++ 2M Karras, guidance 5 unless `--guidance`). Every image is measured by `demo_scenes.read_scene`
(pixel statistics: border median for the background, far-from-background pixels for the shape,
nearest palette colour, centroid grid cell, nearest mean silhouette for the class):

- colour: shape colour and background both match the caption;
- shape: the shape class matches; position: the 3x3 grid cell matches;
- LoRA: at weight 1, at least 10% of the shape's rim pixels are near white (no-LoRA images of
  non-white scenes score ~0); at weight 0, the image equals the no-LoRA image (max abs diff);
- upscaler: PSNR of the demo x4 upscaler and of PIL Lanczos x4 against the 128 px drawing of
  100 held-out scenes, from their 32 px reductions.

Prints one table; the targets are 90% / 75% / 80% / 90% / +2 dB. `--weights DIR` grades the
output folder of a `tools/train_demo.py` run instead of the shipped `imagegen/data/demo/`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagegen import demo_scenes as ds  # noqa: E402

DEMO = ROOT / "imagegen" / "data" / "demo"
LORA = DEMO / "demo-outline.safetensors"
UPSCALER = DEMO / "demo-x4.pth"
OUTLINE_MIN = 0.1  # rim fraction near white that counts as "outlined"


def held_out_scenes() -> list[ds.Scene]:
    """One caption per held-out pair: background, size and position from a fixed seed."""
    rng = np.random.default_rng(7)
    out = []
    positions = list(ds.POSITIONS)
    for i, (colour, shape) in enumerate(ds.HELD_OUT):
        bg = colour
        while bg in (colour,):
            bg = ds.COLOURS[rng.integers(len(ds.COLOURS))]
        out.append(ds.Scene(shape, colour, bg, ("small", "large")[i % 2], positions[(i * 4) % 9]))
    return out


def render(engine, captions: list[str], seeds: list[int], steps: int, side: int = 32, guidance: float = 5.0):
    from imagegen.engine import GenRequest

    reqs = [GenRequest(c, "", s, side, side, steps, guidance, "DPM++ 2M Karras") for c in captions for s in seeds]
    out = []
    for i in range(0, len(reqs), 16):
        out += [np.asarray(r.image, dtype=np.float32) for r in engine.generate(reqs[i : i + 16])]
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def upscaler_psnr(n: int = 100) -> tuple[float, float]:
    """(demo x4, Lanczos x4) mean PSNR over `n` held-out scenes: 32 px box reduction -> 128 px."""
    import torch
    from PIL import Image

    from imagegen.upscale.model import load_upscaler

    up = load_upscaler(UPSCALER, device="cpu")
    rng = np.random.default_rng(11)
    ours, lanczos = [], []
    for _ in range(n):
        s = ds.random_scene(rng, training=False)
        hi = ds.draw(s, 128)
        lo = hi.resize((32, 32), Image.BOX)
        x = torch.from_numpy(np.asarray(lo, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        y = (up(x)[0].permute(1, 2, 0).numpy() * 255).round()
        ours.append(psnr(y, np.asarray(hi)))
        lanczos.append(psnr(np.asarray(lo.resize((128, 128), Image.LANCZOS)), np.asarray(hi)))
    return float(np.mean(ours)), float(np.mean(lanczos))


def use_weights(folder: Path) -> None:
    """Grade the demo files in `folder` (unet/, vae/, text_encoder/, the LoRA, the upscaler)."""
    global LORA, UPSCALER
    from imagegen.engine import builtin

    missing = [n for n in ("unet", "vae", "text_encoder", LORA.name, UPSCALER.name) if not (folder / n).exists()]
    if missing:
        sys.exit(f"demo_quality: {folder}: no {', '.join(missing)}")
    builtin.DEMO_DIR = folder  # read by demo_components at load time
    LORA, UPSCALER = folder / LORA.name, folder / UPSCALER.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--lora-seeds", type=int, help="seeds per caption for the LoRA rows (default: --seeds)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="save a sheet of the base renders here (PNG)")
    ap.add_argument("--parts", default="base,lora,sr", help="comma list of base, lora, sr")
    ap.add_argument("--weights", type=Path, help="a train_demo.py --out folder to grade (default: the shipped files)")
    a = ap.parse_args()
    if a.weights:
        use_weights(a.weights)
    import torch

    torch.set_num_threads(a.threads)
    from imagegen.engine import open_engine

    t0 = time.time()
    parts = a.parts.split(",")
    engine = open_engine("builtin:demo-sd15", device="cpu")
    scenes = held_out_scenes()
    caps = [s.caption() for s in scenes]
    seeds = list(range(a.seeds))
    per = len(seeds)
    if "base" in parts or "lora" in parts:
        base = render(engine, caps, seeds, a.steps, guidance=a.guidance)
        print(f"builtin:demo-sd15 on {len(caps)} held-out captions x {per} seeds = {len(base)} images, {a.steps} steps, DPM++ 2M Karras, cfg {a.guidance:g}")
    if "base" in parts:
        ok = {"colour": 0, "shape": 0, "position": 0}
        for i, s in enumerate(scenes):
            row = {"colour": 0, "shape": 0, "position": 0}
            for img in base[i * per : (i + 1) * per]:
                r = ds.read_scene(img.astype(np.uint8))
                row["colour"] += r.colour == s.colour and r.background == s.background
                row["shape"] += r.shape == s.shape
                row["position"] += r.position == s.position
            for k in ok:
                ok[k] += row[k]
            print(f"  {caps[i]:<66} colour {row['colour']:>2}/{per}  shape {row['shape']:>2}/{per}  position {row['position']:>2}/{per}")
        n = len(base)
        print(f"colour + background match   {100 * ok['colour'] / n:5.1f}%  (target >= 90%)")
        print(f"shape class                 {100 * ok['shape'] / n:5.1f}%  (target >= 75%)")
        print(f"position                    {100 * ok['position'] / n:5.1f}%  (target >= 80%)")
        if a.out:
            from PIL import Image

            grid = np.concatenate([np.concatenate(base[i * per : (i + 1) * per], 1) for i in range(len(caps))], 0)
            Image.fromarray(grid.astype(np.uint8)).save(a.out)
    if "lora" in parts:
        # captions whose shape and background are not white (an outline on white is invisible)
        keep = [i for i, s in enumerate(scenes) if "white" not in (s.colour, s.background)]
        lcaps = [caps[i] for i in keep]
        lseeds = list(range(a.lora_seeds or a.seeds))
        lbase = render(engine, lcaps, lseeds, a.steps, guidance=a.guidance)  # same batches as the LoRA renders below
        engine.set_loras([(str(LORA), 1.0)])
        l1 = render(engine, lcaps, lseeds, a.steps, guidance=a.guidance)
        engine.set_loras([(str(LORA), 0.0)])
        l0 = render(engine, lcaps, lseeds, a.steps, guidance=a.guidance)
        engine.set_loras([])
        eff1 = [ds.read_scene(img.astype(np.uint8)).outline >= OUTLINE_MIN for img in l1]
        eff_base = [ds.read_scene(img.astype(np.uint8)).outline >= OUTLINE_MIN for img in lbase]
        same0 = max(float(np.abs(x - y).max()) for x, y in zip(l0, lbase))
        print(f"LoRA outline at weight 1    {100 * np.mean(eff1):5.1f}%  of {len(l1)} (no LoRA: {100 * np.mean(eff_base):.1f}%; target >= 90%)")
        print(f"LoRA weight 0 vs no LoRA    max abs pixel diff {same0:.1f} (target 0)")
    if "sr" in parts:
        ours, lanczos = upscaler_psnr()
        print(f"upscaler x4 PSNR            demo {ours:.2f} dB, Lanczos {lanczos:.2f} dB, gain {ours - lanczos:+.2f} dB (target >= +2 dB)")
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
