"""SRVGGNetCompact: Real-ESRGAN's compact VGG-style net (Wang et al. 2021), in plain torch from
the published architecture, used by realesr-general-x4v3 (32 convs) and realesr-animevideov3
(16 convs): a plain conv+PReLU stack whose last conv feeds a pixel shuffle, added to a nearest
upsample of the input. Parameter names follow the BasicSR layout. Imports torch; import lazily.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SRVGGNetCompact(nn.Module):
    """Compact SR net: conv, PReLU, `num_conv` x (conv, PReLU), conv to out*scale^2, pixel shuffle.

    The nearest-upsampled input is added to the shuffled output (the net learns a residual).
    Modules live in one `body` list so the parameter names are `body.0` ... `body.K`.
    """

    def __init__(
        self,
        *,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_conv: int = 16,
        scale: int = 4,
    ) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = F.pixel_shuffle(out, self.scale)
        return out.add_(F.interpolate(x, scale_factor=self.scale, mode="nearest"))
