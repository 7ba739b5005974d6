"""A fake engine for store / sheet / CLI tests that need many images fast.

The render path itself is tested end to end on the tiny diffusers models (test_render.py,
test_engine.py); this stand-in only draws a flat colour derived from the seed."""

from __future__ import annotations

import hashlib

from PIL import Image

from imagegen.engine import GenResult


class FakeEngine:
    family = "sd15"
    device = "cpu"
    dtype = "fp32"
    model_name = "fake"

    def __init__(self, *args, **kwargs) -> None:
        self.loras: tuple = ()
        self.calls: list[int] = []
        self.lora_switches = 0

    def set_loras(self, loras) -> None:
        want = tuple((str(p), float(w)) for p, w in loras)
        if want != self.loras:
            self.lora_switches += 1
            self.loras = want

    def scheduler_config(self, scheduler: str) -> dict:
        return {"_class_name": "Fake", "name": scheduler}

    def generate(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            rgb = hashlib.sha256(f"{r.prompt}|{r.seed}|{self.loras}".encode()).digest()[:3]
            out.append(GenResult(Image.new("RGB", (r.width, r.height), tuple(rgb)), None))
        return out


def fake_opener(holder: list | None = None):
    def open_engine(*args, **kwargs):
        engine = FakeEngine()
        if holder is not None:
            holder.append(engine)
        return engine

    return open_engine
