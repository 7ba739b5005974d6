"""Render overhead: `imagegen render` against a plain diffusers loop, side by side.

The plain loop is what people write by hand: one pipeline call per image with its own
seeded CPU generator, then `image.save(path)`. imagegen renders the same jobs (same model,
prompts, seeds, size, steps, scheduler) through its whole path: plan, run store, batched
engine, PNG metadata, thumbnails, manifest. Both are timed from model load to the last file
on disk, alternating, best of `--repeat`. A ratio <= 1.0 means imagegen is not slower.

    python bench/render_overhead.py                      # CPU, builtin:tiny-sd15
    python bench/render_overhead.py --device cuda --model sd15-arch --size 512 --steps 25 \
        --jobs 64 --batch-size 8 --dtype fp16            # GPU (see README for figures)

Not a test: prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# 800 TFLOP/s dense fp16 floor per SD1.5 image at 512x512, 25 steps with CFG (~42.7 TFLOP).
SD15_TFLOP_PER_IMAGE = 42.7
FLOOR_TFLOPS = 800.0


def recipe_text(args: argparse.Namespace, output: Path) -> str:
    seeds = args.jobs // 2
    return textwrap.dedent(f"""
        name: bench
        model:
          checkpoint: builtin:{args.model}
        prompt: "a {{ceramic|glass}} vase on a wooden table, studio light"
        negative: blurry
        seeds: {{start: 100, count: {seeds}}}
        size: {args.size}x{args.size}
        steps: {args.steps}
        guidance: 7.0
        scheduler: {args.scheduler}
        batch_size: {args.batch_size}
        output: {output}
    """)


def run_imagegen(args: argparse.Namespace, workdir: Path) -> float:
    from imagegen.cli import run_app

    out = workdir / "imagegen-run"
    recipe = workdir / "bench.yaml"
    recipe.write_text(recipe_text(args, out))
    argv = ["render", str(recipe), "--no-sheet", "--json"]
    if args.device:
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    sys_stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    t0 = time.perf_counter()
    try:
        code = run_app(argv)
    finally:
        sys.stdout.close()
        sys.stdout = sys_stdout
    seconds = time.perf_counter() - t0
    assert code == 0, f"imagegen render exited {code}"
    assert len(list((out / "images").glob("*.png"))) == args.jobs
    return seconds


def run_plain(args: argparse.Namespace, workdir: Path) -> float:
    import torch

    from imagegen.engine import open_engine
    from imagegen.plan import plan
    from imagegen.recipe import load_recipe

    out = workdir / "plain-run"
    out.mkdir()
    recipe = workdir / "bench-plain.yaml"
    recipe.write_text(recipe_text(args, out))
    jobs = plan(load_recipe(recipe))
    t0 = time.perf_counter()
    # The plain loop uses the same loader (offline, same weights), then the bare pipeline.
    engine = open_engine(f"builtin:{args.model}", device=args.device, dtype=args.dtype)
    pipe = engine.pipeline
    import diffusers

    from imagegen.samplers import lookup_sampler, scheduler_config

    spec = lookup_sampler(args.scheduler)
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(scheduler_config(spec, pipe.scheduler.config),
                                                                          **spec.options)
    for job in jobs:
        image = pipe(job.prompt, negative_prompt=job.negative, width=job.width, height=job.height,
                     num_inference_steps=job.steps, guidance_scale=job.guidance,
                     generator=torch.Generator("cpu").manual_seed(job.seed)).images[0]
        image.save(out / f"{job.index:04d}.png")
    seconds = time.perf_counter() - t0
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd15")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=32, help="even number of images")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--scheduler", default="DPM++ 2M Karras")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    args.jobs -= args.jobs % 2

    # Build/cache the model once, outside the timings.
    from imagegen.engine import open_engine

    warm = open_engine(f"builtin:{args.model}", device=args.device, dtype=args.dtype)
    device, dtype = warm.device, warm.dtype
    del warm

    times: dict[str, list[float]] = {"plain": [], "imagegen": []}
    for _ in range(args.repeat):
        for name, fn in (("plain", run_plain), ("imagegen", run_imagegen)):
            with tempfile.TemporaryDirectory() as tmp:
                times[name].append(fn(args, Path(tmp)))
    best = {k: min(v) for k, v in times.items()}
    print(f"render overhead: {args.jobs} images, builtin:{args.model}, {args.size}x{args.size}, {args.steps} steps, "
          f"{args.scheduler}, batch {args.batch_size}, {device} {dtype}, best of {args.repeat}")
    for name in ("plain", "imagegen"):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:9s} {best[name]:8.2f} s  ({args.jobs / best[name]:.2f} img/s; runs: {runs}; median {statistics.median(times[name]):.2f})")
    print(f"  ratio imagegen/plain = {best['imagegen'] / best['plain']:.3f}  (<= 1.0: imagegen is not slower)")
    if args.model == "sd15-arch" and args.size == 512 and args.steps == 25:
        per_image = best["imagegen"] / args.jobs
        floor = SD15_TFLOP_PER_IMAGE / FLOOR_TFLOPS
        print(f"  imagegen {per_image * 1000:.1f} ms/image; physical floor {floor * 1000:.1f} ms/image "
              f"-> {100 * floor / per_image:.1f}% of the floor")


if __name__ == "__main__":
    main()
