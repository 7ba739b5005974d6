"""Benchmark (not a test): upscale a 1536x1024 image to 17000 px wide in bounded memory.

Default: CPU, a small SRVGGNetCompact with random weights (so it finishes in a minute or two),
tiled Deflate BigTIFF output. Prints peak memory (max RSS), the wall time, and each stage's
own time: model (tiles + blending), resize, encode (compression + writing). The stages of the
last pass run side by side (imagegen/upscale/stages.py), so the wall time is compared with the
slowest stage (the floor with enough cores) and with the sum of the stages (what running them
one after another costs). `--compare` also runs the sequential path first, on the same image,
and checks that both files are byte for byte the same.

    .venv/bin/python bench/upscale.py                       # CPU figures, target <= 2.5 GB RSS
    .venv/bin/python bench/upscale.py --compare --format png   # sequential vs overlapped
    .venv/bin/python bench/upscale.py --device cuda --arch x4plus --width 6144
        # RealESRGAN_x4plus-sized RRDBNet (23 blocks, 64 feat, 32 grow), fp16: output MP/s
        # and the share of the compute floor (~2.24 TFLOP per output megapixel).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Network shapes by name: constructor kwargs for the networks in imagegen.upscale.archs.
ARCHS = {
    "compact-small": ("SRVGGNetCompact", dict(num_feat=16, num_conv=4, scale=4)),
    "general-x4v3": ("SRVGGNetCompact", dict(num_feat=64, num_conv=32, scale=4)),
    "animevideov3": ("SRVGGNetCompact", dict(num_feat=64, num_conv=16, scale=4)),
    "x4plus": ("RRDBNet", dict(num_feat=64, num_block=23, num_grow=32)),
    "anime6b": ("RRDBNet", dict(num_feat=64, num_block=6, num_grow=32)),
    "x2plus": ("RRDBNet", dict(num_feat=64, num_block=23, num_grow=32, unshuffle=2)),
}
TFLOP_PER_OUTPUT_MP = {"x4plus": 2.24}  # compute floor quoted in the issue (RRDBNet x4plus)
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def source_image(w: int, h: int, path: Path) -> None:
    from PIL import Image, PngImagePlugin

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(0)
    img = np.stack([128 + 80 * np.sin(xx / (40 + 9 * c)) * np.cos(yy / (33 + 5 * c)) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "bench image\nSteps: 1, Seed: 0")
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, pnginfo=info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="compact-small")
    ap.add_argument("--src", default="1536x1024", help="source size WxH")
    ap.add_argument("--width", type=int, default=17000, help="target width")
    ap.add_argument("--format", default="tif", choices=["tif", "png", "jpg"])
    ap.add_argument("--tile", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="folder for the output (default: a temp dir)")
    ap.add_argument("--compare", action="store_true", help="run the sequential path too and compare")
    ap.add_argument("--sequential", action="store_true", help="only the sequential path (no overlap)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs; the last one is reported (default: 1 on CPU, 2 on CUDA so cuDNN autotuning is excluded)")
    args = ap.parse_args()

    import torch

    from imagegen.upscale import load_upscaler, plan_passes, upscale_image
    from imagegen.upscale.archs.compact.net import SRVGGNetCompact
    from imagegen.upscale.archs.rrdbnet.net import RRDBNet

    w, h = map(int, args.src.split("x"))
    tmp = tempfile.TemporaryDirectory()
    folder = args.out or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    rss_start = max_rss_mb()

    # 1. Random weights in the BasicSR layout, loaded through the real loader.
    torch.manual_seed(0)
    cls_name, kwargs = ARCHS[args.arch]
    net = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}[cls_name](**kwargs)
    for p in net.parameters():  # keep activations in range like a trained net
        p.data.mul_(0.1)
    weights = folder / f"bench-{args.arch}.pth"
    torch.save({"params_ema": net.state_dict()}, weights)
    del net
    up = load_upscaler(weights, device=args.device, dtype=args.dtype)
    src = folder / "src.png"
    source_image(w, h, src)
    plan = plan_passes(w, h, up.scale, target_width=args.width)
    print(f"device {up.device} {up.dtype}; model {up.describe()}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(plan.describe())

    # 2. Upscale.
    if up.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    repeat = args.repeat or (2 if up.device.startswith("cuda") else 1)
    modes = [False, True] if args.compare else [not args.sequential]
    results = {}
    for overlap in modes:
        dst = folder / f"out-{'overlap' if overlap else 'sequential'}.{args.format}"
        for _ in range(repeat):
            dst.unlink(missing_ok=True)
            tm: dict[str, float] = {}
            t0 = time.perf_counter()
            upscale_image(src, dst, up, plan, tile=args.tile, fmt=args.format, timings=tm, overlap=overlap)
            wall = time.perf_counter() - t0
        results[overlap] = (dst, tm, wall)

    # 3. Report.
    out_mp = sum(s.out_size[0] * s.out_size[1] for s in plan.steps if s.kind == "model") / 1e6
    fw, fh = plan.final_size
    for overlap, (dst, tm, wall) in results.items():
        stages = {k: tm.get(k, 0.0) for k in ("read", "model", "resize", "alpha", "encode") if k in tm}
        slowest = max(stages, key=stages.get)
        print(f"{'overlapped' if overlap else 'sequential'}: wall {wall:.1f} s; "
              + " + ".join(f"{k} {v:.1f}" for k, v in stages.items())
              + f" = sum of stages {sum(stages.values()):.1f} s; slowest stage {slowest} {stages[slowest]:.1f} s"
              + f" (wall / slowest {wall / max(stages[slowest], 1e-9):.2f}, wall / sum {wall / max(sum(stages.values()), 1e-9):.2f})")
        print(f"  model throughput {out_mp / tm['model']:.2f} output MP/s ({out_mp:.1f} MP over {plan.passes} passes)")
    dst = results[modes[-1]][0]
    print(f"output {fw}x{fh} ({fw * fh / 1e6:.1f} MP), file {dst.stat().st_size / 1e6:.1f} MB ({args.format})")
    if args.compare:
        same = results[False][0].read_bytes() == results[True][0].read_bytes()
        seq_wall, ovl_wall = results[False][2], results[True][2]
        print(f"sequential {seq_wall:.1f} s vs overlapped {ovl_wall:.1f} s: x{seq_wall / ovl_wall:.2f}; "
              f"files {'byte-identical' if same else 'DIFFER'}")
    tm = results[modes[-1]][1]
    print(f"peak memory: max RSS {max_rss_mb():.0f} MB (after imports {rss_start:.0f} MB)")
    if up.device.startswith("cuda"):
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")
        floor = TFLOP_PER_OUTPUT_MP.get(args.arch)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in name), None)
        if floor and peak:
            achieved = floor * out_mp / tm["model"]
            print(f"compute: {achieved:.0f} TFLOP/s = {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s fp16 dense")
    tmp.cleanup()


if __name__ == "__main__":
    main()
