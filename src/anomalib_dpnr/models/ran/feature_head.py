"""RAN's joint pixel-feature model ``P(x, f)`` (Lu et al., Eq. 10): a head on a decoder level of the denoiser.

The head (GroupNorm, SiLU, 1x1 conv, as the reference) reads one decoder block's output of the same UNet pass that
predicts the noise and predicts the frozen backbone's features of the clean image ``f(x_0)`` from ``x_t``. The
block's output is captured with a forward hook, so the diffusers UNet runs unchanged (also inside ONNX exports).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn
from torch.nn import functional as F

__all__ = ["FeatureHead", "feature_error"]


class FeatureHead(nn.Module):
    """Predict ``[B, C_f, h, w]`` backbone features from decoder block ``block`` of ``unet``.

    Args:
        unet: The denoiser; its ``up_blocks[block]`` output is read on every forward pass.
        block: Index into ``unet.up_blocks`` (0 = the deepest decoder block).
        out_channels: Backbone feature channels ``C_f``.
        norm_num_groups: GroupNorm groups (must divide the block's width).
    """

    def __init__(self, unet: UNet2DModel, block: int, out_channels: int, norm_num_groups: int) -> None:
        super().__init__()
        blocks = len(unet.up_blocks)
        if not -blocks <= block < blocks:
            msg = f"feature_block must index the denoiser's {blocks} decoder blocks, got {block}"
            raise ValueError(msg)
        widths = list(reversed(unet.config.block_out_channels))
        channels = widths[block % blocks]
        self.head = nn.Sequential(nn.GroupNorm(norm_num_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 1))
        self._captured: list[torch.Tensor] = []
        unet.up_blocks[block].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        del module, inputs
        self._captured.append(output)

    def clear(self) -> None:
        """Drop captured activations (call before the UNet pass whose features :meth:`forward` reads)."""
        self._captured.clear()

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """The features predicted from the last UNet pass, resized to ``grid`` (area pooling down, bilinear up)."""
        if not self._captured:
            msg = "FeatureHead: no decoder activation captured; run the denoiser first"
            raise RuntimeError(msg)
        # one activation per UNet call since clear() (the denoiser's CPU inference runs in chunks of images);
        # bfloat16/float16 under the denoiser's low-precision inference
        captured = torch.cat(self._captured) if len(self._captured) > 1 else self._captured[0]
        features = self.head(captured.to(self.head[-1].weight.dtype))
        self._captured.clear()
        if tuple(features.shape[-2:]) == tuple(grid):
            return features
        if features.shape[-2] >= grid[0] and features.shape[-1] >= grid[1]:
            return F.adaptive_avg_pool2d(features, grid)
        return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def feature_error(predicted: torch.Tensor, target: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Eq. 10 per location: ``mean_c (f(x_0) - f_theta(x_t))^2``, upsampled to ``size``: ``[B, 1, H, W]``."""
    error = (predicted.float() - target.float()).pow(2).mean(dim=1, keepdim=True)
    return F.interpolate(error, size=size, mode="bilinear", align_corners=False)
