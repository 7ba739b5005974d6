"""The host tail of a batch: from the decoded images to 8-bit RGB results.

diffusers' numpy output copies the whole batch to the host as float32 and the rounding to 8
bits then runs on the CPU, in the render loop, before the next batch can start. Here the
images stay a tensor ("pt" output): the NaN check and the rounding run on the device, only
uint8 crosses to the host (a quarter of the bytes), through pinned memory with a non-blocking
copy and one wait on the stream; PNG encoding and thumbnails then run in the writer threads
(imagegen/render/writer.py) while the next batch renders. The arithmetic is diffusers' own
(float32, `x * 255`, round half to even), so on CPU the pixels are exactly those of the numpy
path (tests/test_engine_tail.py).
"""

from __future__ import annotations

from typing import Any, Sequence


def to_host_uint8(images: Any) -> tuple[Any, list[bool]]:
    """A B x 3 x H x W tensor in [0, 1] (on any device) -> (B x H x W x 3 uint8 numpy array on
    the host, whether each image is finite). Rounded as `(x * 255).round()` in float32."""
    import torch

    x = images.float()  # diffusers' numpy output is float32 before it is rounded
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if u8.device.type == "cuda":
        host = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
        flags = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(u8, non_blocking=True)
        flags.copy_(finite, non_blocking=True)
        torch.cuda.current_stream(u8.device).synchronize()  # the copies, queued behind the decode
        u8, finite = host, flags
    return u8.numpy(), [bool(f) for f in finite.tolist()]


def results(images: Any, firsts: Sequence[Any] | None, result_type: Any) -> list:
    """`result_type` (GenResult) per image: a tensor batch through `to_host_uint8`; a list of
    float HxWx3 arrays (the hires pass) rounded on the host as before. NaN -> an error result."""
    import numpy as np
    from PIL import Image

    if hasattr(images, "permute"):
        arrays, finite = to_host_uint8(images)
    else:
        finite = [bool(np.isfinite(a).all()) for a in images]
        arrays = [(a * 255).round().astype("uint8") if ok else None for a, ok in zip(images, finite)]
    out = []
    for i, ok in enumerate(finite):
        if not ok:
            out.append(result_type(None, "NaN in output"))
            continue
        kept = Image.fromarray(firsts[i]) if firsts is not None else None
        out.append(result_type(Image.fromarray(arrays[i]).convert("RGB"), first=kept))
    return out
