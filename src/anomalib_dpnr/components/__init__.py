"""Pieces shared by the diffusion models: schedules, UNets, synthetic anomalies, processing."""

from .base import DiffusionAnomalyModule
from .diffusion import NoiseSchedule, ddim_loop, gaussian_noise
from .processing import (
    AnomalyScorer,
    diffusion_evaluator,
    diffusion_pre_processor,
    from_unit_range,
    gaussian_blur,
    image_size_pair,
    to_unit_range,
    topk_mean,
)
from .synthetic import SyntheticAnomalyGenerator, estimate_foreground, self_augment
from .unet import Denoiser, build_unet, check_widths, parse_inference_dtype, unet_downsampling_factor
from .validation import check_images

__all__ = [
    "AnomalyScorer",
    "Denoiser",
    "DiffusionAnomalyModule",
    "NoiseSchedule",
    "SyntheticAnomalyGenerator",
    "build_unet",
    "check_widths",
    "check_images",
    "ddim_loop",
    "diffusion_evaluator",
    "diffusion_pre_processor",
    "estimate_foreground",
    "from_unit_range",
    "gaussian_noise",
    "gaussian_blur",
    "image_size_pair",
    "parse_inference_dtype",
    "self_augment",
    "to_unit_range",
    "topk_mean",
    "unet_downsampling_factor",
]
