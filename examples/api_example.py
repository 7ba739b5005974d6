"""Render, review, pick and upscale from Python (runs in seconds on a CPU, no download)."""

import sys
import tempfile
from pathlib import Path

import torch

from imagegen.api import load_recipe, pick, plan, render, sheet, status, upscale
from imagegen.errors import ImagegenError
from imagegen.upscale.archs.compact.net import SRVGGNetCompact

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())

# 1. A recipe from a dict (or: load_recipe("recipes/example.yaml")); relative paths use base_dir.
recipe = load_recipe({
    "name": "api-demo",
    "model": {"checkpoint": "builtin:tiny-sd15"},
    "prompt": "a {red|blue} cup on a table",
    "seeds": 2,
    "size": "64x64",
    "steps": 2,
    "output": "runs/api-demo",
}, base_dir=work)

# 2. Plan: every job with its index and stable id; nothing is loaded.
jobs = plan(recipe)
print(f"{len(jobs)} jobs; job 1 is {jobs[0].id}: {jobs[0].prompt!r} seed {jobs[0].seed}")

# 3. Render with a progress callback (resumable: a second call renders nothing).
summary = render(recipe, device="cpu", on_progress=lambda done, total: print(f"  rendered {done}/{total}"))
print(f"rendered {summary.rendered}, failed {summary.failed}")

# 4. Where the run stands, contact sheets, picks.
run = recipe.output
print(status(run)["done"], "done")
pages, index = sheet(run, by="prompt")
print(f"{len(pages)} sheet page(s), index at {index}")
print("picks:", pick(run, 1, "3-4"))

# 5. Upscale the picks. A random-weight x4 network stands in for RealESRGAN weights here.
torch.manual_seed(0)
weights = work / "x4-random.pth"
torch.save({"params": SRVGGNetCompact(num_feat=8, num_conv=2, scale=4).state_dict()}, weights)
result = upscale(run, model=weights, width=128, fmt="png", device="cpu")
print("upscaled:", [p.name for p in result.written])

# Errors are ImagegenError subclasses with a one-line message.
try:
    pick(run, 99)
except ImagegenError as exc:
    print("refused:", exc.message)
