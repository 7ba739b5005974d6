"""LoRA stability probe: tells a state bug from a chaotic model.

For each job (one image alone) it measures how far pixels move when the LoRA weights move by
`--eps` (1e-6) and when the starting noise moves by `--eps`, and, side by side, how far the
same job moves between a batch of `--batch-size` and a render alone:

- stable under the perturbations but batch-dependent: a state bug (the engine's fault);
- unstable under the perturbations: the model + LoRA set is numerically chaotic for that job,
  so last-bit rounding differences of batched matrix products grow into a different picture.

    python bench/lora_stability.py --tiny-lora strong      # the issue-10 newcomer's case
    python bench/lora_stability.py --tiny-lora realistic   # a LoRA scaled like trained ones
    python bench/lora_stability.py --model builtin:tiny-sd15 --lora style.safetensors:0.8
    python bench/lora_stability.py --tiny-lora strong --float64 --eps 1e-14   # chaos beyond fp64

`--tiny-lora strong|realistic` builds a random LoRA for the tiny model with the test helpers
(`make_tiny_lora`, `make_realistic_lora` in tests/engine_fixtures.py). Not a test: prints
figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_lora(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        return text, 1.0


def tiny_lora(kind: str, family: str, folder: Path, te: bool, fmt: str) -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from engine_fixtures import make_realistic_lora, make_tiny_lora

    path = folder / f"{kind}-{family}-{fmt}{'' if te else '-unet'}.safetensors"
    if kind == "strong":
        return str(make_tiny_lora(path, family, fmt=fmt, text_encoder=te))
    return str(make_realistic_lora(path, family, fmt=fmt, text_encoder=te))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-sdxl")
    ap.add_argument("--lora", action="append", default=[], help="PATH[:WEIGHT], repeatable")
    ap.add_argument("--tiny-lora", choices=["strong", "realistic"], help="build a random LoRA for the tiny model")
    ap.add_argument("--lora-weight", type=float, default=0.8, help="weight of --tiny-lora")
    ap.add_argument("--unet-only", action="store_true", help="--tiny-lora without text-encoder layers")
    ap.add_argument("--fmt", choices=["kohya", "diffusers"], default="kohya", help="format of --tiny-lora")
    ap.add_argument("--prompt", action="append", help="repeatable (default: 4 prompts)")
    ap.add_argument("--seeds", default="1", help="comma-separated")
    ap.add_argument("--negative", default="")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--scheduler", default="Euler a")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eps", type=float, default=None, help="perturbation (default 1e-6; 1e-3 in fp16/bf16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--float64", action="store_true",
                    help="run the pipeline in float64: a state bug still shows, rounding almost vanishes")
    args = ap.parse_args()

    import torch

    from imagegen.engine import GenRequest, open_engine
    from imagegen.engine.stability import probe_stability

    torch.set_num_threads(args.threads)
    engine = open_engine(args.model, device=args.device, dtype=args.dtype)
    if args.float64:
        engine.pipeline.to(torch.float64)
    tmp = tempfile.TemporaryDirectory()
    loras = [parse_lora(t) for t in args.lora]
    if args.tiny_lora:
        path = tiny_lora(args.tiny_lora, engine.family, Path(tmp.name), not args.unet_only, args.fmt)
        loras.append((path, args.lora_weight))
    engine.set_loras(loras)
    prompts = args.prompt or ["a cat", "a dog", "a house", "a tree"]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [GenRequest(p, args.negative, s, args.size, args.size, args.steps, args.guidance, args.scheduler)
            for p in prompts for s in seeds]  # fmt: skip
    lora_text = ", ".join(f"{Path(p).name}:{w:g}" for p, w in loras) or "no LoRA"
    dtype = "float64" if args.float64 else engine.dtype
    print(f"{engine.model_name} ({engine.family}, {engine.device} {dtype}) + {lora_text}; "
          f"{args.size}px, {args.steps} steps, {args.scheduler}, guidance {args.guidance:g}")  # fmt: skip

    import numpy as np

    started = time.monotonic()
    batched = []
    for i in range(0, len(jobs), args.batch_size):
        batched += engine.generate(jobs[i : i + args.batch_size])
    print(f"{'job':<24} {'batch ' + str(args.batch_size) + ' vs alone':>18}   probe (one image alone)")
    unstable = 0
    for job, b in zip(jobs, batched):
        st = probe_stability(engine, job, eps=args.eps)
        alone = engine.generate([job])[0].image
        bd = int(np.abs(np.asarray(b.image, np.int16) - np.asarray(alone, np.int16)).max())
        unstable += not st.stable
        label = f"{job.prompt[:16]!r} seed {job.seed}"
        print(f"{label:<24} {bd:>14}/255   {'STABLE' if st.stable else 'UNSTABLE'}: {st.summary()}", flush=True)
    verdict = ("chaotic: the model + LoRA amplify rounding; batch differences are expected" if unstable
               else "stable: any batch difference above 1/255 is a state bug")  # fmt: skip
    print(f"{unstable}/{len(jobs)} jobs unstable -> {verdict} ({time.monotonic() - started:.1f} s)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
