"""Seam-free tiled inference that yields the upscaled image as uint8 row strips.

The (padded) input is cut into equal overlapping tiles: each side is split evenly (`layout`:
the fewest tiles no larger than the tile size that overlap by at least `overlap`, all of one
size, spread evenly), so the tile plan depends on the image size and the tile size only, and
no last tile is squeezed against the border with a huge overlap. Each tile's output is weighted by a
separable feather: on sides that touch a neighbouring tile, the outermost `margin` pixels get
weight 0 (they saw zero padding) and the next `overlap - 2*margin` pixels ramp up with a raised
cosine; sides on the image border keep weight 1. Overlapping outputs are summed with their
weights and divided by the summed weight, so there is never a hard paste.

Rows of tiles ("bands") are processed top to bottom; after a band, every output row above the
next band's first row is final and is yielded as uint8, and only the overlapping rows are kept
(in float32, one band high, on the model's device). Nothing image-sized is ever float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagegen.errors import InputError, ModelError
from imagegen.upscale.model import Upscaler

# Defaults, one place.
CPU_TILE_BYTES = 384 << 20  # activation budget for one CPU tile
CPU_BAND_BYTES = 256 << 20  # float32 band accumulator on CPU (output width x band height x 3)
CUDA_FREE_SHARE = 0.6  # share of free CUDA memory used for tiles + band accumulators
MAX_TILE = 512  # input pixels per tile side on CPU
CUDA_MAX_TILE = 1024  # input pixels per tile side on CUDA when memory allows (fewer overlaps to compute twice)
MIN_TILE = 32  # smallest automatic tile side
MIN_EXPLICIT_TILE = 16  # smallest `tile` a caller may ask for (smaller tiles cannot overlap usefully)
MIN_BACKOFF_TILE = 16  # out-of-memory halving stops (with an error) below this
MAX_BATCH = 16  # tiles per forward call on CUDA
OVERLAP = 32  # input pixels shared by neighbouring tiles (capped at tile/4)
STRIP_ROWS = 256  # output rows per yielded uint8 strip


@dataclass(frozen=True)
class TileConfig:
    """Tile side, overlap and discarded margin, in input pixels; batch in tiles."""

    tile: int
    overlap: int
    margin: int
    batch: int


def _round_down(v: int, m: int) -> int:
    return max(m, v // m * m)


def layout(n: int, tile: int, overlap: int, multiple: int = 1) -> tuple[int, list[int]]:
    """Split [0, n) evenly: (tile side, start positions) of the fewest tiles no larger than `tile`
    whose neighbours overlap by at least `overlap`. All tiles have one size; starts (and the
    size, when `n` and `tile` are) are multiples of `multiple`. Depends on its arguments only."""
    if n <= tile:
        return n, [0]
    m = max(multiple, 1)
    k = -(-(n - overlap) // max(1, tile - overlap))  # tiles needed
    t = -(-(n + (k - 1) * overlap) // k)  # the smallest equal size that covers n with k tiles
    t = min(tile, -(-t // m) * m)
    span = n - t
    return t, [(i * span // m) // (k - 1) * m for i in range(k - 1)] + [span]


def cuda_usable_bytes(device: str) -> int:
    """Memory a tile can use on a CUDA device: free memory plus the blocks PyTorch has cached
    but not allocated. `mem_get_info()` alone counts the cache as used, so from the second image
    on tiles would shrink and pixels would depend on what ran before."""
    import torch

    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))


def free_memory(device: str) -> None:
    """Collect garbage and return cached CUDA blocks (after an out-of-memory error)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def choose_config(up: Upscaler, width: int, height: int, tile: int | None) -> TileConfig:
    """Pick the tile size: `tile` if given (0 = whole image), else from free memory.

    On CUDA the budget is a share of `cuda_usable_bytes` (free + cached - allocated: the same
    for every image once the model is loaded, so the plan depends on the image only); on CPU fixed budgets for the tile
    activations and for the float32 band accumulators, which grow with the output width.
    Raises `InputError` for a `tile` between 1 and 15.
    """
    p = max(up.pad_multiple, 1)
    out_w = width * up.scale
    bpp = up.bytes_per_input_pixel()
    cuda = up.device.startswith("cuda")
    budget = int(cuda_usable_bytes(up.device) * CUDA_FREE_SHARE) if cuda else 0
    if tile is not None and tile != 0 and tile < MIN_EXPLICIT_TILE:
        raise InputError(f"`tile` must be 0 (whole image) or at least {MIN_EXPLICIT_TILE} pixels; got {tile}")
    if tile == 0:
        t = max(-(-width // p) * p, -(-height // p) * p)  # the padded image in one tile
    elif tile is not None:
        t = _round_down(tile, max(p, 8))
    elif cuda:
        t = CUDA_MAX_TILE
        while t > MIN_TILE and bpp * t * t + 24 * out_w * t * up.scale > budget:
            t //= 2
    else:
        t_mem = int(math.sqrt(CPU_TILE_BYTES / bpp))
        t_band = CPU_BAND_BYTES // (12 * out_w * up.scale)
        t = _round_down(max(MIN_TILE, min(MAX_TILE, t_mem, t_band)), 16)
    t = max(p, t - t % p)
    batch = 1
    if cuda and tile != 0:
        band = 24 * out_w * t * up.scale  # band accumulator + carry, float32 RGB
        batch = int(max(1, min(MAX_BATCH, (budget - band) // max(1, bpp * t * t))))
    overlap = min(OVERLAP, t // 4)
    overlap -= overlap % p
    margin = overlap // 4
    return TileConfig(tile=t, overlap=overlap, margin=margin, batch=batch)


def feather(length: int, scale: int, *, left: bool, right: bool, overlap: int, margin: int) -> np.ndarray:
    """1-D blend weight over one tile's output (length = tile * scale), see the module doc."""
    u = np.arange(length * scale, dtype=np.float64) + 0.5
    ramp = max(overlap - 2 * margin, 1) * scale
    w = np.ones_like(u)
    if left:
        w = np.minimum(w, np.clip((u - margin * scale) / ramp, 0, 1))
    if right:
        w = np.minimum(w, np.clip((length * scale - u - margin * scale) / ramp, 0, 1))
    return (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)


class Tiler:
    """Runs `up` over an image tile by tile; remembers out-of-memory backoffs between calls."""

    def __init__(self, up: Upscaler, *, progress: Callable[[int], None] | None = None) -> None:
        self.up = up
        self.progress = progress
        self.batch_cap = MAX_BATCH

    # -- forward with out-of-memory backoff ---------------------------------------------
    def _forward(self, batch: Any, cfg: TileConfig) -> Any:
        import torch

        try:
            return self.up(batch)
        except torch.OutOfMemoryError:
            pass  # retry below, outside this block: its traceback keeps the failed activations alive
        free_memory(self.up.device)
        if batch.shape[0] > 1:
            self.batch_cap = max(1, batch.shape[0] // 2)
            half = batch.shape[0] // 2
            return torch.cat([self._forward(batch[:half], cfg), self._forward(batch[half:], cfg)])
        sub = cfg.tile // 2
        if sub < MIN_BACKOFF_TILE:
            raise ModelError(
                f"out of memory on {self.up.device} even with {cfg.tile}-pixel tiles; "
                "free GPU memory or use `--device cpu`"
            )
        # Run this one tile as an image of its own with half-size tiles, blended the same way.
        sub_cfg = TileConfig(tile=sub, overlap=min(cfg.overlap, sub // 4), margin=min(cfg.margin, sub // 16), batch=1)
        rows = [r for r, _ in self._bands(batch[0], sub_cfg, count=False)]
        return torch.cat(rows, dim=1).unsqueeze(0)

    # -- the band loop ------------------------------------------------------------------------
    def _bands(self, x: Any, cfg: TileConfig, *, count: bool = True) -> Iterator[tuple[Any, int]]:
        """Yield (float rows CxhxW on device, first output row) for a CxHxW float tensor in [0,1]."""
        import torch

        s, p = self.up.scale, max(self.up.pad_multiple, 1)
        _, h, w = x.shape
        ty, ys = layout(h, cfg.tile, cfg.overlap, p)
        tx, xs = layout(w, cfg.tile, cfg.overlap, p)
        dev = x.device
        fx = [feather(tx, s, left=x0 > 0, right=x0 + tx < w, overlap=cfg.overlap, margin=cfg.margin) for x0 in xs]
        fy = [feather(ty, s, left=y0 > 0, right=y0 + ty < h, overlap=cfg.overlap, margin=cfg.margin) for y0 in ys]
        # The tiles form a grid, so the summed weight is separable: sum_i wy_i(y) * sum_j wx_j(x).
        # Two 1-D sums replace a full-size weight accumulator.
        sum_x = np.zeros(w * s, np.float32)
        for x0, f in zip(xs, fx):
            sum_x[x0 * s : (x0 + tx) * s] += f
        sum_y = np.zeros(h * s, np.float32)
        for y0, f in zip(ys, fy):
            sum_y[y0 * s : (y0 + ty) * s] += f
        wx = [torch.from_numpy(f).to(dev) for f in fx]
        norm_x = torch.from_numpy(sum_x).to(dev)
        carry: Any = None  # accumulated rows from the previous band that the next band adds to
        for bi, y0 in enumerate(ys):
            wy = torch.from_numpy(fy[bi]).to(dev)
            acc = torch.zeros((3, ty * s, w * s), dtype=torch.float32, device=dev)
            if carry is not None:
                acc[:, : carry.shape[1]] = carry
            step = max(1, min(cfg.batch, self.batch_cap))
            for i in range(0, len(xs), step):
                chunk = xs[i : i + step]
                batch = torch.stack([x[:, y0 : y0 + ty, x0 : x0 + tx] for x0 in chunk])
                if batch.dtype == torch.uint8:
                    batch = batch.to(torch.float32 if dev.type == "cpu" else torch.float16).div_(255)
                batch = batch.contiguous(memory_format=torch.channels_last)
                out = self._forward(batch, cfg).float()
                for j, x0 in enumerate(chunk):
                    acc[:, :, x0 * s : (x0 + tx) * s].addcmul_(out[j], wy[:, None] * wx[i + j][None, :])
                if count and self.progress is not None:
                    self.progress(len(chunk))
            nxt = ys[bi + 1] if bi + 1 < len(ys) else None
            keep = (nxt - y0) * s if nxt is not None else ty * s
            carry = acc[:, keep:].clone() if nxt is not None else None
            norm_y = torch.from_numpy(sum_y[y0 * s : y0 * s + keep]).to(dev)
            rows = acc[:, :keep].div_(norm_x).div_(norm_y[:, None])  # in place: no second band
            yield rows, y0 * s
            del acc, rows

    def tile_count(self, width: int, height: int, cfg: TileConfig) -> int:
        p = max(self.up.pad_multiple, 1)
        h, w = -(-height // p) * p, -(-width // p) * p
        return len(layout(h, cfg.tile, cfg.overlap, p)[1]) * len(layout(w, cfg.tile, cfg.overlap, p)[1])

    def strips(self, image: np.ndarray, cfg: TileConfig) -> Iterator[np.ndarray]:
        """Yield the upscaled `image` (HxWx3 uint8) as uint8 strips of full output width, top down.

        x2/x1 models get the input reflect-padded to a multiple of their unshuffle factor; the
        padding is cropped from the output.
        """
        import torch

        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 array, got {image.shape} {image.dtype}")
        s, p = self.up.scale, max(self.up.pad_multiple, 1)
        h, w = image.shape[:2]
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            mode = "reflect" if h > ph and w > pw else "edge"
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
        dev = torch.device(self.up.device)
        x = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(dev).permute(2, 0, 1)  # uint8 CxHxW
        out_h, out_w = h * s, w * s
        for rows, row0 in self._bands(x, cfg):
            n = min(rows.shape[1], out_h - row0)
            # Convert in slices so the uint8 copies stay small next to the band.
            for r in range(0, max(n, 0), STRIP_ROWS):
                part = rows[:, r : min(n, r + STRIP_ROWS), :out_w]
                u8 = part.mul_(255).round_().clamp_(0, 255).to(torch.uint8)  # rows are ours to change
                yield u8.permute(1, 2, 0).contiguous().cpu().numpy()
