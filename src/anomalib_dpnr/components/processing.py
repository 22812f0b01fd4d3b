"""Pre-processing to ``[-1, 1]``, the default evaluator, and anomaly-map scoring helpers."""

from __future__ import annotations

import torch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components.filters import GaussianBlur2d
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

__all__ = [
    "AnomalyScorer",
    "DiffusionPreProcessor",
    "gaussian_blur",
    "diffusion_evaluator",
    "diffusion_pre_processor",
    "from_unit_range",
    "image_size_pair",
    "to_unit_range",
    "topk_mean",
]


def image_size_pair(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``256`` or ``(256, 256)`` to ``(H, W)``."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        msg = f"image_size must be an int or (height, width), got {image_size!r}"
        raise ValueError(msg)
    return size  # type: ignore[return-value]


def resize_weights(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """``[size_out, size_in]`` matrix of torch's antialiased bilinear resize along one axis (``align_corners=False``).

    Row ``i`` weighs input pixel ``j`` by the triangle filter ``max(0, 1 - |x|)`` at
    ``x = (j + 0.5 - (i + 0.5) * s) / max(s, 1)``, ``s = size_in / size_out``, normalised to sum 1. ``x`` is formed
    from integers (``((2j + 1) size_out - (2i + 1) size_in) / (2 max(size_in, size_out))``) so that it stays exact
    when a runtime computes in bf16 (OpenVINO on CPUs that have it). ``size_in`` may be symbolic (export).
    """
    rows = torch.arange(size_out, device=like.device).unsqueeze(1) * 2 + 1
    cols = torch.arange(size_in, device=like.device).unsqueeze(0) * 2 + 1
    offset = (cols * size_out - rows * size_in) / (2 * torch.sym_max(size_in, size_out))
    weights = (1 - offset.abs()).clamp_min(0).to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


class MatrixResize(nn.Module):
    """Antialiased bilinear resize to ``size`` as two matrix products: what torchvision's ``Resize`` computes, in
    a form every runtime executes alike (OpenVINO's antialiased ``Resize`` differs from torch's by up to 0.4)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., H, W]`` to ``[..., *size]``."""
        height, width = images.shape[-2:]
        return resize_weights(height, self.size[0], images) @ images @ resize_weights(width, self.size[1], images).T


def exportable(transform: Transform) -> Transform:
    """``transform`` with each antialiased bilinear ``Resize`` to a fixed ``(H, W)`` as :class:`MatrixResize`; the
    rest as anomalib's ``get_exportable_transform`` makes it."""
    if isinstance(transform, Compose):
        return Compose([exportable(t) for t in transform.transforms])
    bilinear = isinstance(transform, Resize) and InterpolationMode(transform.interpolation) == InterpolationMode.BILINEAR
    if bilinear and transform.antialias and transform.max_size is None and len(transform.size) == 2:
        return MatrixResize(tuple(transform.size))
    return get_exportable_transform(transform)


class DiffusionPreProcessor(PreProcessor):
    """``PreProcessor`` whose inference path resizes exactly as training, test and ``anomalib predict`` do.

    ``forward`` (``model(x)``, ``TorchInferencer``) applies ``transform`` itself and exported graphs (ONNX,
    OpenVINO) its :func:`exportable` form. anomalib's own turns antialiasing off for both, so an image not
    already at ``image_size`` would be resized one way by ``predict`` and another by every deployed model.
    """

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Apply ``transform`` (:func:`exportable` while exporting)."""
        if not self.transform:
            return batch
        return (exportable(self.transform) if torch.compiler.is_exporting() else self.transform)(batch)


def diffusion_pre_processor(image_size: int | tuple[int, int] = 256) -> DiffusionPreProcessor:
    """Resize (antialiased, also in exports) and map ``[0, 1]`` images to ``[-1, 1]`` (standard torchvision
    transforms only)."""
    return DiffusionPreProcessor(
        transform=Compose([
            Resize(image_size_pair(image_size), antialias=True),
            Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]),
    )


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` to ``[0, 1]``."""
    return images * 0.5 + 0.5


def from_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` to ``[-1, 1]``."""
    return images * 2 - 1


def diffusion_evaluator() -> Evaluator:
    """Image AUROC/F1 and pixel AUROC/F1/AUPRO (pixel metrics skip datasets without masks)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ],
    )


def gaussian_blur(sigma: float, channels: int = 1) -> nn.Module:
    """anomalib's ``GaussianBlur2d`` with a ``4 sigma`` radius, or ``Identity`` for ``sigma = 0``.

    Its kernel follows from ``sigma`` (a constructor argument), so it is a non-persistent buffer: a checkpoint
    reloaded with another sigma (``load_from_checkpoint(path, smoothing_sigma=8)``) gets the kernel of that sigma.
    """
    if sigma < 0:
        msg = f"Gaussian sigma must be >= 0, got {sigma}"
        raise ValueError(msg)
    if sigma == 0:
        return nn.Identity()
    blur = GaussianBlur2d(sigma=sigma, channels=channels, kernel_size=2 * int(4.0 * sigma + 0.5) + 1)
    blur.register_buffer("kernel", blur.kernel.contiguous(), persistent=False)
    return blur


def topk_mean(anomaly_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the ``k`` largest values of each ``[B, 1, H, W]`` map (DiffusionAD Alg. 2)."""
    flat = anomaly_map.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(dim=1)


class AnomalyScorer(nn.Module):
    """Gaussian-smooth a ``[B, 1, H, W]`` map and score each image by its top-k mean.

    Args:
        sigma: Gaussian standard deviation in pixels; ``0`` disables smoothing.
        top_k: Number of highest map values averaged into the image score.
    """

    def __init__(self, sigma: float = 4.0, top_k: int = 50) -> None:
        super().__init__()
        if sigma < 0 or top_k < 1:
            msg = f"need sigma >= 0 and top_k >= 1, got sigma={sigma}, top_k={top_k}"
            raise ValueError(msg)
        self.sigma = sigma
        self.top_k = top_k
        self.blur = gaussian_blur(sigma)

    def forward(self, anomaly_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(smoothed_map, image_score)``."""
        anomaly_map = self.blur(anomaly_map)
        return anomaly_map, topk_mean(anomaly_map, self.top_k)
