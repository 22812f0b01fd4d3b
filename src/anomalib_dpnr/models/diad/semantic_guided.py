"""Semantic-Guided (SG) network of DiAD (He et al., Sec. "Semantic-Guided Network", Eq. 7, Fig. 2).

A trainable copy of the denoiser's encoder and middle block (ControlNet-style, weights copied from the denoiser by
diffusers' ``ControlNetModel.from_unet``), fed ``z_t + C(x_0)``: the noisy latent through the copied first input
block (``conv_in``) plus the input image through the hint encoder ``C`` (reference: convs 3->16->16->32(s2)->32->
96(s2)->96->256(s2), SiLU after each, then a zero-initialised conv to the first block's width: diffusers'
``ControlNetConditioningEmbedding`` with channels ``(16, 32, 96, 256)``). Every encoder output and the middle block
output pass a zero-initialised 1x1 conv and are added to the denoiser: the middle block output after the denoiser's
middle block, the encoder outputs to its skip connections. With ``only_mid_control`` (reference default) only the
middle block and the skips of the first decoder level (SD's decoder blocks 0-2; outputs 9-11) are controlled.
The SFF block (``feature_fusion.py``) fuses the level above into those deepest outputs before their zero convs.

diffusers' ``ControlNetModel`` builds and initialises all of this; its ``forward`` offers no place for SFF between
the encoder and the zero convs, so :meth:`SemanticGuidedNetwork.forward` runs its modules itself.
"""

from __future__ import annotations

import math

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from .feature_fusion import SpatialFeatureFusion

__all__ = ["SemanticGuidedNetwork", "skip_levels"]


def skip_levels(unet: nn.Module) -> tuple[list[int], list[int]]:
    """Resolution level and channels of each skip output of a diffusers UNet encoder: ``conv_in`` (level 0), then
    per down block its ResNet outputs and, where it downsamples, the downsampled output (next level, same width)."""
    widths = unet.config.block_out_channels
    levels, channels = [0], [widths[0]]
    for index, block in enumerate(unet.down_blocks):
        levels += [index] * len(block.resnets)
        channels += [widths[index]] * len(block.resnets)
        if getattr(block, "downsamplers", None):
            levels.append(index + 1)
            channels.append(widths[index])
    return levels, channels


def _run_block(block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> tuple:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=hidden, temb=emb, encoder_hidden_states=context)
    return block(hidden_states=hidden, temb=emb)


class SemanticGuidedNetwork(nn.Module):
    """SG network: control residuals for the denoiser from ``(z_t, t, context, x_0)`` (Eq. 7).

    Args:
        denoiser: The denoising ``UNet2DConditionModel`` whose encoder and middle block are copied.
        hint_channels: Hint encoder widths ``C`` (reference: ``(16, 32, 96, 256)``).
        hint_downsampling: Spatial reduction from image to latent (the VAE factor: 8; 1 in pixel space). The hint
            encoder's last ``log2`` of it transitions stride 2, the others stride 1.
        only_mid_control: Control the middle block and the first decoder level's skips only (reference); ``False``:
            every skip connection (full ControlNet).
        fusion: Apply the SFF block to the deepest encoder outputs.
    """

    def __init__(
        self,
        denoiser: UNet2DConditionModel,
        hint_channels: tuple[int, ...] = (16, 32, 96, 256),
        hint_downsampling: int = 8,
        only_mid_control: bool = True,
        fusion: bool = True,
    ) -> None:
        super().__init__()
        hint_channels = tuple(int(c) for c in hint_channels)
        strides = int(math.log2(hint_downsampling)) if hint_downsampling >= 1 else -1
        if 2**strides != hint_downsampling or not hint_channels or strides > len(hint_channels) - 1:
            msg = (
                f"hint_downsampling must be a power of 2 reachable by the hint encoder ({len(hint_channels) - 1} "
                f"transitions for hint_channels={hint_channels}), got {hint_downsampling}"
            )
            raise ValueError(msg)
        self.copy = ControlNetModel.from_unet(denoiser, conditioning_embedding_out_channels=hint_channels)
        transitions = [conv for k, conv in enumerate(self.copy.controlnet_cond_embedding.blocks) if k % 2 == 1]
        for conv in transitions[: len(transitions) - strides]:  # only the last `strides` transitions downsample
            conv.stride = (1, 1)
        levels, channels = skip_levels(denoiser)
        deepest = max(levels)
        self.controlled = [i for i, level in enumerate(levels) if level == deepest or not only_mid_control]
        for i, _ in enumerate(levels):  # zero convs of uncontrolled outputs would never train: none are kept
            if i not in self.controlled:
                self.copy.controlnet_down_blocks[i] = nn.Identity()
        self.only_mid_control = only_mid_control
        sources = [i for i, level in enumerate(levels) if level == deepest - 1]
        targets = [i for i, level in enumerate(levels) if level == deepest]
        self.fusion = SpatialFeatureFusion(sources, targets, channels) if fusion and deepest > 0 else None

    def encode(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """SG encoder outputs (after SFF) and middle block output, before the zero convs."""
        copy = self.copy
        emb = copy.time_embedding(copy.time_proj(timesteps.expand(noisy.shape[0])).to(noisy.dtype))
        hidden = copy.conv_in(noisy) + copy.controlnet_cond_embedding(images.to(noisy.dtype))
        outputs = [hidden]
        for block in copy.down_blocks:
            hidden, residuals = _run_block(block, hidden, emb, context)
            outputs += list(residuals)
        middle = copy.mid_block(hidden, emb, encoder_hidden_states=context) if getattr(copy.mid_block, "has_cross_attention", False) else copy.mid_block(hidden, emb)
        if self.fusion is not None:
            outputs = self.fusion(outputs)
        return outputs, middle

    def forward(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, images: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Control residuals: one per denoiser skip (zeros where uncontrolled) and one for the middle block."""
        outputs, middle = self.encode(noisy, timesteps, context, images)
        down = tuple(
            self.copy.controlnet_down_blocks[i](out) if i in self.controlled else torch.zeros_like(out) for i, out in enumerate(outputs)
        )
        return down, self.copy.controlnet_mid_block(middle)
