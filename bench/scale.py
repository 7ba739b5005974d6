"""Images per second with 1 and 2 (or more) render workers on the same jobs.

    PYTHONPATH=$PWD python bench/scale.py [--workers 1,2] [--jobs 32] [--size 128] [--steps 10]
                                          [--model builtin:tiny-sd15] [--device cpu | --gpus all]
                                          [--ray auto|HOST:PORT]

Each count renders the same recipe (batch 1) into a fresh run folder through
`render_with_workers`, the code path of `imagegen render --workers N` / `--gpus`. Reported per
count: render img/s (first model loaded to last image written, as the finish line shows), wall
seconds including process start and model loads, each worker's share, and whether the images
equal the first count's: the largest per-channel difference (0/255 when the torch thread count
per worker is the same; CPU kernels sum in another order with another count, which can move a
pixel by one or two levels).

With `--ray`, each count is a number of Ray actors (`render_with_ray`, the path of `imagegen
render --ray`; CPU actors with --device cpu, else GPU actors); the connection is made once,
before the first count, so the wall time holds the actors' start and model loads, not Ray's.

On CPU, N workers split the machine's cores (`torch.set_num_threads(cores // N)` each), so the
ratio is bounded by the cores: on a 2-core machine two workers can at best match one worker that
uses both cores, plus what running two processes' Python and PNG work side by side overlaps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagegen.recipe import load_recipe  # noqa: E402
from imagegen.render import RenderOptions  # noqa: E402
from imagegen.render.workers import render_with_workers, worker_devices  # noqa: E402
from imagegen.store import RunStore  # noqa: E402


def recipe_text(model: str, jobs: int, size: int, steps: int) -> str:
    seeds = ", ".join(str(100 + i) for i in range(jobs))
    return (f"name: scale\nmodel:\n  checkpoint: {model}\nprompts:\n  - \"a red cup on a table\"\nseeds: [{seeds}]\n"
            f"size: {size}x{size}\nsteps: {steps}\nbatch_size: 1\noutput: run\n")


def pixels(run: Path) -> dict[str, "object"]:
    """Each image's pixels by file name (the PNG bytes differ: their metadata holds timings)."""
    import numpy as np
    from PIL import Image

    out = {}
    for p in sorted((run / "images").glob("*.png")):
        with Image.open(p) as im:
            out[p.name] = np.asarray(im.convert("RGB"), dtype=np.int16)
    return out


def max_difference(a: dict, b: dict) -> str:
    """The largest per-channel difference between two runs' images ("0" = identical), or why not comparable."""
    if a.keys() != b.keys():
        return "other files"
    return str(max(int(abs(a[k] - b[k]).max()) for k in a)) if a else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (CPU), e.g. 1,2")
    ap.add_argument("--gpus", default=None, help="`all` or 0,2: compare 1 GPU worker with one per listed GPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="builtin:tiny-sd15")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per CPU worker (default: cores // workers)")
    ap.add_argument("--ray", default=None, metavar="auto|HOST:PORT", help="Ray actors instead of worker processes")
    args = ap.parse_args()
    connected = False
    if args.ray:
        from imagegen.render.ray_driver import connect

        ray, connected = connect(args.ray)

    if args.ray:
        counts = [(n, [args.device] * n) for n in map(int, args.workers.split(","))]
    elif args.gpus:
        all_devices = worker_devices(gpus=args.gpus)
        counts = [(1, all_devices[:1]), (len(all_devices), all_devices)]
    else:
        counts = [(n, worker_devices(workers=n, device=args.device)) for n in map(int, args.workers.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.yaml"
        path.write_text(recipe_text(args.model, args.jobs, args.size, args.steps))
        recipe = load_recipe(path)
        print(f"{args.jobs} jobs, {args.model}, {args.size}x{args.size}, {args.steps} steps, batch 1; "
              f"{os.cpu_count()} CPU cores visible")
        print(f"{'actors' if args.ray else 'workers':>7} {'devices':<24} {'img/s':>7} {'wall s':>7}  per worker (rendered)  max diff vs first")
        first: dict | None = None
        base = None
        for n, devices in counts:
            folder = Path(tmp) / f"run-{n}"
            t0 = time.monotonic()
            with RunStore.open(folder) as store:
                if args.ray:
                    from imagegen.render.ray_driver import render_with_ray

                    s = render_with_ray(recipe, store, address=args.ray, actors=n,
                                        options=RenderOptions(device=args.device, batch_size=1))
                else:
                    s = render_with_workers(recipe, store, devices, options=RenderOptions(batch_size=1), threads=args.threads)
                shares = ", ".join(f"{w['name']} {w['rendered']}" for w in store.workers())
            wall = time.monotonic() - t0
            images = pixels(folder)
            first = images if first is None else first
            base = base or s.images_per_second
            ratio = f" (x{s.images_per_second / base:.2f})" if base else ""
            print(f"{n:>7} {','.join(sorted(set(devices))) + f' x{n}':<24} {s.images_per_second:>7.2f} {wall:>7.1f}  "
                  f"{shares:<22} {max_difference(images, first)}/255{ratio}")


    if connected:
        ray.shutdown()


if __name__ == "__main__":
    main()
