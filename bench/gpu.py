"""One GPU benchmark (not a test): prints one table of the figures issue 18 asks for.

    python bench/gpu.py                        # CUDA, full-size random-weight architectures
    python bench/gpu.py --device cpu --quick   # CPU, the tiny built-ins: a few minutes (tested)

Rows:
- SD1.5 (builtin:sd15-arch, 512 px, 25 steps, CFG 7; quick: builtin:tiny-sd15, 64 px, 6 steps):
  img/s through `Engine.generate` in batches of 8, the same jobs through a plain diffusers loop
  (one pipeline call per image with its own seeded CPU generator), and the ratio.
- SDXL (builtin:sdxl-arch, 1024 px, 30 steps; quick: builtin:tiny-sdxl, 64 px, 6 steps): s/img.
- compiled (`Engine.compile`: torch.compile, static shapes, channels_last, fused QKV; the
  warm-up batch compiles): SD1.5 img/s and its ratio to the plain loop, the largest pixel
  difference to eager, SDXL s/img. On by default, off with --quick (inductor takes minutes
  on a CPU) unless --compile.
- batch 1 vs batch 8: the largest pixel difference (0-255) between the same 8 jobs rendered
  one by one and as one batch.
- Wh/image: measured by NVML (GPU) or RAPL (CPU) around the SD1.5 batches, else "not measured".
- upscale: a RealESRGAN_x4plus-sized RRDBNet (quick: a small compact net) from 1536x1024 to
  17000 px wide (quick: 192x128 to 1536 px), tiled Deflate TIFF: wall time incl. encoding,
  the slowest stage and the sum of the stages (they run side by side: the wall time sits
  between the two), output MP/s, peak memory.
Everything runs offline with random weights: the images are noise, the timings are real.
Each timed part is run once first (warm-up: cuDNN autotuning, allocator) and then timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a ceramic vase on a wooden table, studio light", "a glass vase on a wooden table, studio light"]
FULL = {"sd15": ("sd15-arch", 512, 25), "sdxl": ("sdxl-arch", 1024, 30), "images": 16, "sdxl_images": 8,
        "upscale": ("x4plus", "1536x1024", 17000)}
QUICK = {"sd15": ("tiny-sd15", 64, 6), "sdxl": ("tiny-sdxl", 64, 6), "images": 16, "sdxl_images": 8,
         "upscale": ("compact-small", "192x128", 1536)}
BATCH = 8


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def requests(n: int, size: int, steps: int, seed0: int = 100):
    from imagegen.engine import GenRequest

    return [GenRequest(PROMPTS[i % 2], "blurry", seed0 + i, size, size, steps, 7.0, "DPM++ 2M Karras") for i in range(n)]


def timed_engine(engine, reqs, meter=None):
    """Seconds (and joules) to render `reqs` in batches of BATCH, after one warm-up batch."""
    from imagegen.energy import NOT_MEASURED, Span

    engine.generate(reqs[:BATCH])
    _sync(engine.device)
    span = Span(meter or NOT_MEASURED).start()
    images = []
    for i in range(0, len(reqs), BATCH):
        images += [r.image for r in engine.generate(reqs[i : i + BATCH])]
    _sync(engine.device)
    span.stop()
    return span.seconds, span.joules, images


def timed_plain(engine, reqs) -> float:
    """The same jobs through the bare pipeline, one call per image (how it is usually written)."""
    import torch

    pipe = engine.pipeline
    engine.generate(reqs[:1])  # sets the scheduler the engine uses for these jobs

    def one(r):
        return pipe(r.prompt, negative_prompt=r.negative, width=r.width, height=r.height, num_inference_steps=r.steps,
                    guidance_scale=r.guidance, generator=torch.Generator("cpu").manual_seed(r.seed)).images[0]

    pipe.scheduler = engine._make_scheduler(reqs[0].scheduler)
    one(reqs[0])  # warm-up
    _sync(engine.device)
    t0 = time.perf_counter()
    for r in reqs:
        pipe.scheduler = engine._make_scheduler(r.scheduler)
        one(r)
    _sync(engine.device)
    return time.perf_counter() - t0


def max_pixel_diff(a, b) -> int:
    import numpy as np

    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b))


def bench_upscale(arch: str, src_size: str, width: int, device: str, folder: Path) -> dict:
    import torch

    spec = importlib.util.spec_from_file_location("bench_upscale", ROOT / "bench" / "upscale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from imagegen.upscale import load_upscaler, plan_passes, upscale_image
    from imagegen.upscale.archs.compact.net import SRVGGNetCompact
    from imagegen.upscale.archs.rrdbnet.net import RRDBNet

    torch.manual_seed(0)
    cls_name, kwargs = mod.ARCHS[arch]
    net = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}[cls_name](**kwargs)
    for p in net.parameters():
        p.data.mul_(0.1)
    weights = folder / f"{arch}.pth"
    torch.save({"params_ema": net.state_dict()}, weights)
    del net
    up = load_upscaler(weights, device=device)
    w, h = map(int, src_size.split("x"))
    src = folder / "src.png"
    mod.source_image(w, h, src)
    plan = plan_passes(w, h, up.scale, target_width=width)
    dst = folder / "out.tif"
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):  # the first run warms up (cuDNN autotuning); the second is reported
        dst.unlink(missing_ok=True)
        tm: dict[str, float] = {}
        t0 = time.perf_counter()
        upscale_image(src, dst, up, plan, fmt="tif", timings=tm)
        wall = time.perf_counter() - t0
    fw, fh = plan.final_size
    vram = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    stages = {k: tm[k] for k in ("read", "model", "resize", "alpha", "encode") if k in tm}
    slowest = max(stages, key=stages.get)
    return {"what": f"{arch} {w}x{h} -> {fw}x{fh}", "wall": wall, "mps": fw * fh / 1e6 / wall, "vram": vram,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024,
            "slowest": (slowest, stages[slowest]), "sum": sum(stages.values())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: fp16 on GPU, fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="tiny built-ins and a small upscale (CPU, minutes)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: sdxl, upscale")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="also time compiled engines (default: yes, but not with --quick)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    skip = set(filter(None, args.skip.split(",")))
    compiled = (not args.quick) if args.compile is None else args.compile

    import torch

    from imagegen.energy import meter_for, watt_hours
    from imagegen.engine import open_engine

    rows: list[tuple[str, str]] = []
    out: dict = {}
    # 1. SD1.5: engine batches, a plain diffusers loop, batch invariance, energy.
    model, size, steps = cfg["sd15"]
    eng = open_engine(f"builtin:{model}", device=args.device, dtype=args.dtype)
    device_name = torch.cuda.get_device_name(torch.device(eng.device)) if eng.device.startswith("cuda") else "CPU"
    reqs = requests(cfg["images"], size, steps)
    meter = meter_for(eng.device)
    sec, joules, batched = timed_engine(eng, reqs, meter)
    plain = timed_plain(eng, reqs)
    singles = [eng.generate([r])[0].image for r in reqs[:BATCH]]
    out["sd15_img_s"] = len(reqs) / sec
    out["plain_img_s"] = len(reqs) / plain
    out["batch_diff"] = max_pixel_diff(singles, batched[:BATCH])
    out["wh_per_image"] = None if joules is None else watt_hours(joules) / len(reqs)
    label = f"SD1.5 {model} {size}px {steps} steps, batch {BATCH}"
    rows += [(f"{label}: img/s", f"{out['sd15_img_s']:.2f}"),
             (f"plain diffusers loop, same jobs: img/s", f"{out['plain_img_s']:.2f}"),
             ("ratio imagegen / plain loop", f"{out['sd15_img_s'] / out['plain_img_s']:.2f}x"),
             (f"batch 1 vs batch {BATCH}: max pixel difference", f"{out['batch_diff']}/255"),
             (f"energy ({meter.source}): Wh/image", "not measured" if out["wh_per_image"] is None else f"{out['wh_per_image']:.3f}")]
    if compiled:
        eng.compile()
        sec, _, comp = timed_engine(eng, reqs)
        out["sd15_compiled_img_s"] = len(reqs) / sec
        out["compiled_diff"] = max_pixel_diff(comp, batched)
        rows += [(f"{label}, compiled: img/s", f"{out['sd15_compiled_img_s']:.2f}"),
                 ("ratio compiled / plain loop", f"{out['sd15_compiled_img_s'] / out['plain_img_s']:.2f}x"),
                 ("compiled vs eager: max pixel difference", f"{out['compiled_diff']}/255")]
    del eng
    # 2. SDXL: s/img.
    if "sdxl" not in skip:
        model, size, steps = cfg["sdxl"]
        eng = open_engine(f"builtin:{model}", device=args.device, dtype=args.dtype)
        reqs = requests(cfg["sdxl_images"], size, steps)
        sec, _, _ = timed_engine(eng, reqs)
        out["sdxl_s_img"] = sec / len(reqs)
        rows.append((f"SDXL {model} {size}px {steps} steps, batch {BATCH}: s/img", f"{out['sdxl_s_img']:.3f}"))
        if compiled:
            eng.compile()
            sec, _, _ = timed_engine(eng, reqs)
            out["sdxl_compiled_s_img"] = sec / len(reqs)
            rows.append((f"SDXL {model} {size}px {steps} steps, batch {BATCH}, compiled: s/img",
                         f"{out['sdxl_compiled_s_img']:.3f}"))
        del eng
    # 3. Upscale.
    if "upscale" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            u = bench_upscale(*cfg["upscale"], args.device, Path(tmp))
        out["upscale"] = u
        vram = "-" if u["vram"] is None else f"{u['vram']:.1f}"
        rows += [(f"upscale {u['what']} (TIFF): wall s", f"{u['wall']:.1f}"),
                 ("upscale stages run side by side: slowest / sum of stages s",
                  f"{u['slowest'][0]} {u['slowest'][1]:.1f} / {u['sum']:.1f}"),
                 ("upscale output MP/s", f"{u['mps']:.1f}"),
                 ("upscale peak VRAM / RSS GiB", f"{vram} / {u['rss']:.1f}")]
    # 4. One table.
    width = max(len(r[0]) for r in rows)
    print(f"imagegen GPU benchmark on {device_name} ({args.device}), torch {torch.__version__}"
          f"{', quick' if args.quick else ''}")
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"| {'-' * width} | ----- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return out


if __name__ == "__main__":
    main()
