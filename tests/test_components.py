"""Shared components: schedule math, synthetic anomalies, scoring, UNet factory, input checks."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import UNet2DModel

from anomalib_dpnr.components import (
    AnomalyScorer,
    NoiseSchedule,
    SyntheticAnomalyGenerator,
    build_unet,
    check_images,
    estimate_foreground,
    self_augment,
    topk_mean,
)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_noising_then_one_step_x0_with_true_noise_recovers_x0(schedule: str) -> None:
    sched = NoiseSchedule(1000, beta_schedule=schedule)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 100, 500, 900])
    x_t = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(sched.predict_x0(x_t, noise, t), x0, atol=2e-3, rtol=0)
    # and the noising is the DDPM closed form, not a no-op
    abar = sched.alphas_cumprod[500]
    torch.testing.assert_close(x_t[2], abar.sqrt() * x0[2] + (1 - abar).sqrt() * noise[2])
    assert (x_t[3] - x0[3]).abs().mean() > 0.5


def test_linear_schedule_matches_paper_endpoints() -> None:
    sched = NoiseSchedule(1000, "linear", 1e-4, 0.02)
    betas = 1 - sched.alphas_cumprod[1:] / sched.alphas_cumprod[:-1]
    assert betas[0].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-3)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-3)
    assert torch.all(sched.snr(torch.tensor([10])) > sched.snr(torch.tensor([900])))


def test_schedule_rejects_out_of_range_steps() -> None:
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        NoiseSchedule(1000).check_timesteps([100, 1000])


def _object_images(batch: int = 4, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark background with a bright disc; returns images and the true disc mask."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).float()
    images = 0.1 + 0.7 * disc.expand(batch, 3, size, size) + 0.02 * torch.rand(batch, 3, size, size)
    return images, disc


def test_estimate_foreground_finds_the_object() -> None:
    images, disc = _object_images()
    fg = estimate_foreground(images)
    assert fg.shape == (4, 1, 64, 64)
    agreement = (fg[:, 0] == disc).float().mean()
    assert agreement > 0.97


def test_estimate_foreground_uses_whole_image_for_textures() -> None:
    texture = torch.rand(2, 3, 32, 32)
    assert estimate_foreground(texture).all()


def test_synthetic_anomalies_stay_inside_the_foreground_with_matching_masks() -> None:
    torch.manual_seed(0)
    images, disc = _object_images(batch=16)
    generator = SyntheticAnomalyGenerator(probability=1.0)
    augmented, masks = generator(images)
    assert augmented.shape == images.shape
    assert masks.shape == (16, 1, 64, 64)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    fg = estimate_foreground(images)
    assert (masks * (1 - fg)).sum() == 0, "anomaly outside the foreground"
    assert masks.flatten(1).any(dim=1).float().mean() > 0.8, "most images should get an anomaly"
    changed = (augmented - images).abs().amax(dim=1, keepdim=True) > 1e-6
    assert not (changed & (masks == 0)).any(), "pixels changed outside the mask"
    assert changed[masks == 1].float().mean() > 0.5, "the mask marks pixels that were not changed"


def test_synthetic_probability_zero_leaves_images_normal() -> None:
    images, _ = _object_images()
    augmented, masks = SyntheticAnomalyGenerator(probability=0.0)(images)
    assert torch.equal(augmented, images)
    assert masks.sum() == 0


def test_synthetic_texture_folder(tmp_path) -> None:
    from torchvision.io import write_png

    for index in range(2):
        write_png((torch.rand(3, 40, 40) * 255).to(torch.uint8), str(tmp_path / f"t{index}.png"))
    images = torch.rand(3, 3, 32, 32)
    generator = SyntheticAnomalyGenerator(anomaly_source_path=tmp_path, probability=1.0, use_foreground=False)
    augmented, masks = generator(images)
    assert masks.sum() > 0
    assert augmented.shape == images.shape
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        SyntheticAnomalyGenerator(anomaly_source_path=empty)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        SyntheticAnomalyGenerator(anomaly_source_path=tmp_path / "nope")


def test_self_augment_changes_appearance_and_keeps_range() -> None:
    image = torch.rand(3, 64, 64)
    out = self_augment(image)
    assert out.shape == image.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, image)


def test_unshuffled_self_augment_keeps_the_image_structure() -> None:
    """``shuffle_probability`` 0: tone and texture change, structure stays; 1: the grid shuffle breaks it."""
    random.seed(0)
    ramp = torch.linspace(0.05, 0.95, 64).expand(3, 64, 64).clone()  # constant down every column
    for _ in range(20):
        kept = self_augment(ramp, shuffle=False)
        assert kept.std(dim=1).max() < 0.01, "an unshuffled appearance moved pixels"
    assert max(self_augment(ramp).std(dim=1).max() for _ in range(5)) > 0.05, "the shuffle did not move cells"
    never = SyntheticAnomalyGenerator(probability=1.0, use_foreground=False, shuffle_probability=0.0)
    always = SyntheticAnomalyGenerator(probability=1.0, use_foreground=False)
    assert all(never._appearance(ramp).std(dim=1).max() < 0.01 for _ in range(10))
    assert max(always._appearance(ramp).std(dim=1).max() for _ in range(5)) > 0.05
    mixed = SyntheticAnomalyGenerator(shuffle_probability=0.5)
    kinds = {bool(mixed._appearance(ramp).std(dim=1).max() < 0.01) for _ in range(30)}
    assert kinds == {True, False}, "a share of 0.5 should give both kinds"
    with pytest.raises(ValueError, match="shuffle_probability"):
        SyntheticAnomalyGenerator(shuffle_probability=1.5)
    with pytest.raises(ValueError, match="self-textured anomalies only"):
        SyntheticAnomalyGenerator(anomaly_source_path=".", shuffle_probability=0.5)


def test_topk_mean_and_scorer() -> None:
    amap = torch.zeros(2, 1, 8, 8)
    amap[0, 0, 0, :4] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert topk_mean(amap, 2).tolist() == [3.5, 0.0]
    smoothed, score = AnomalyScorer(sigma=1.0, top_k=1)(amap)
    assert smoothed.shape == amap.shape
    assert 0 < score[0] < 4.0  # smoothing spreads the peak
    with pytest.raises(ValueError, match="top_k"):
        AnomalyScorer(top_k=0)


def test_build_unet_layout_and_errors() -> None:
    unet = build_unet(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), attention_head_dim=8,
                      norm_num_groups=8)
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "AttnDownBlock2D"]
    out = unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).sample
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="positive multiple of norm_num_groups=32"):
        build_unet(block_out_channels=(12, 24))
    with pytest.raises(ValueError, match="at least one level"):
        build_unet(block_out_channels=())
    with pytest.raises(ValueError, match="attention_levels"):
        build_unet(block_out_channels=(32, 32), attention_levels=(5,))


def test_denoiser_infers_cpu_batches_in_chunks_with_the_same_numbers() -> None:
    """Eval mode denoises CPU batches in chunks of images (faster): the numbers of one plain pass."""
    torch.manual_seed(0)
    unet = build_unet(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(1,), attention_head_dim=8,
                      norm_num_groups=8).eval()
    images, timesteps = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        expected = UNet2DModel.forward(unet, images, timesteps).sample  # one plain pass, default layout
        got = unet(images, timesteps).sample
        assert got.is_contiguous()  # handed back in the caller's layout
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        unet.cpu_chunk = 1  # CPU inference in chunks of images: the same numbers, per-image and shared timesteps alike
        torch.testing.assert_close(unet(images, timesteps).sample, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(unet(images, 1).sample[0], expected[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(2, 1, 64, 64), "3-channel.*grayscale"),
        (torch.rand(2, 4, 64, 64), "3-channel images, got 4"),
        (torch.rand(2, 3, 60, 64), "divisible by 32"),
        (torch.rand(3, 64, 64), r"\[B, C, H, W\]"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
)
def test_check_images_errors(images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_images(images, 3, 32, "Model")


def test_anomaly_shuffle_probability_reaches_the_models_generators() -> None:
    from conftest import TINY_DIFFUSION_AD, TINY_DPNR

    from anomalib_dpnr import DiffusionAD, Dpnr

    dpnr = Dpnr(**TINY_DPNR, anomaly_shuffle_probability=0.25)
    assert dpnr.generator.shuffle_probability == dpnr.repository_generator.shuffle_probability == 0.25
    assert DiffusionAD(**TINY_DIFFUSION_AD, anomaly_shuffle_probability=0.25).generator.shuffle_probability == 0.25
    assert Dpnr(**TINY_DPNR).generator.shuffle_probability == 1.0  # the default: every self-texture shuffled
