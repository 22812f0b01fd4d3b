"""DPNR: repository, DP-SNI, RHN-Loss, ablation switches, checkpoints and latent space."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch
from conftest import TINY_DPNR, benchmark_script

from anomalib_dpnr import Dpnr
from anomalib_dpnr.components import AnomalyScorer, from_unit_range, to_unit_range, topk_mean
from anomalib_dpnr.components.prototypes import PrototypeMemory, kmeans_prototypes, merge_prototypes
from anomalib_dpnr.components.weights import MissingWeightsError
from anomalib_dpnr.models.dpnr.dp_sni import DPSNI, NoiseParameterizer, NoiseParameters
from anomalib_dpnr.models.dpnr.loss import EpsilonLoss, InjectionLoss, RHNLoss
from anomalib_dpnr.models.dpnr.repository import extract_patches
from anomalib_dpnr.models.dpnr.torch_model import DpnrOutput


def _images(batch: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images in ``[-1, 1]`` with a bright object in the middle (so it has a foreground)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, size // 8, size // 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear") * 0.3
    images[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 0.6
    return images * 2 - 1


def _built(**overrides: object) -> Dpnr:
    """A tiny Dpnr whose repository is built from ``_images``."""
    torch.manual_seed(0)
    module = Dpnr(**{**TINY_DPNR, **overrides})

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> torch.Tensor:
            return to_unit_range(_images(8)[index])

    class Batch:
        def __init__(self, images: list[torch.Tensor]) -> None:
            self.image = torch.stack(images)

    Images.collate_fn = staticmethod(Batch)
    module.build_repository(Images())
    module.training_set = Images()  # what the repository (and the map statistics) are fitted on
    return module


# --- Dual-Prototype Noise Repository (Eqs. 6-9) ------------------------------------------------
def test_merging_above_tau_removes_near_duplicates_only() -> None:
    torch.manual_seed(0)
    base = torch.eye(3) * 5  # three orthogonal directions
    near = base + 0.01 * torch.randn(3, 3)  # a near-duplicate of each
    merged = merge_prototypes(torch.cat([base, near]), threshold=0.99)
    assert merged.shape == (3, 3)
    torch.testing.assert_close(merged.sort(dim=0).values, ((base + near) / 2).sort(dim=0).values)
    assert merge_prototypes(torch.cat([base, near]), threshold=1.0).shape == (6, 3)  # nothing is that similar


def test_merging_is_transitive() -> None:
    angles = torch.tensor([0.0, 0.1, 0.2])  # neighbours similar (cos 0.995), ends less so (cos 0.980)
    chain = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert merge_prototypes(chain, threshold=0.99).shape == (1, 2)


def test_kmeans_then_merge_shrinks_a_redundant_repository() -> None:
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 5
    features = centres.repeat_interleave(50, dim=0) + 0.05 * torch.randn(200, 16)
    memory = PrototypeMemory(num_prototypes=12, merge_threshold=0.98, seed=0)
    prototypes = memory.fit(features)
    assert int(memory.initial_count) == 12  # K-Means gives K prototypes, several per true cluster
    assert prototypes.shape == (4, 16)  # merging leaves one per cluster
    assert torch.cdist(prototypes, centres).min(dim=0).values.max() < 0.1
    assert torch.equal(kmeans_prototypes(features, 12, seed=0), kmeans_prototypes(features, 12, seed=0))


def test_prototype_memory_survives_save_and_load() -> None:
    memory = PrototypeMemory(num_prototypes=3)
    memory.fit(torch.randn(30, 8))
    fresh = PrototypeMemory(num_prototypes=3)
    assert not fresh.is_fitted
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.prototypes, memory.prototypes)


def test_patches_come_from_inside_or_outside_the_mask() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, :4, :4] = 1
    inside = extract_patches(images, masks, 4, 0.5, inside=True)
    outside = extract_patches(images, masks, 4, 0.5, inside=False)
    assert inside.shape == (1, 3, 4, 4) and outside.shape == (7, 3, 4, 4)
    torch.testing.assert_close(inside[0], images[0, :, :4, :4])


def test_repository_is_built_and_seeds_the_learnable_prototypes() -> None:
    module = _built()
    repository = module.model.repository
    assert repository.is_fitted
    assert 1 <= repository.foreground.prototypes.shape[0] <= TINY_DPNR["num_prototypes"]
    matcher = module.model.dp_sni.matcher
    torch.testing.assert_close(matcher.foreground_prototypes.data, repository.foreground.prototypes)
    torch.testing.assert_close(matcher.background_prototypes.data, repository.background.prototypes)


# --- DP-SNI (Eqs. 12-21) ----------------------------------------------------------------------
def test_noise_base_is_scaled_tanh_of_the_reparameterised_sample() -> None:
    sni = DPSNI(feature_dim=8, channels=3, noise_scale=2.0)
    mean, log_variance, normal = torch.full((1, 3, 2, 2), 0.5), torch.full((1, 3, 2, 2), math.log(4.0)), torch.ones(1, 3, 2, 2)
    torch.testing.assert_close(sni.noise_base(mean, log_variance, normal), torch.full((1, 3, 2, 2), 2.0 * math.tanh(2.5)))
    torch.manual_seed(0)
    mu, logvar = NoiseParameterizer(8, 3)(torch.randn(2, 8, 4, 4))
    assert 0 < mu.abs().max() < 0.1 and 0 < logvar.abs().max() < 0.1  # training starts near N(0, 1), not at a dead zero


def test_blend_follows_the_foreground_mask() -> None:
    sni = DPSNI(feature_dim=8, channels=3, foreground_weight=0.5, mask_sigma=0.0)
    background, foreground = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    attention = torch.zeros(1, 1, 4, 4)
    attention[..., :2] = 1  # left half foreground
    noise, mask = sni.blend(background, foreground, attention, (16, 16))
    up = torch.nn.functional.interpolate
    up_bg = up(background, size=(16, 16), mode="bicubic")
    up_fg = up(foreground, size=(16, 16), mode="bicubic")
    torch.testing.assert_close(noise[..., :6], 0.5 * up_fg[..., :6])  # deep inside the foreground
    torch.testing.assert_close(noise[..., -6:], up_bg[..., -6:])  # deep inside the background
    torch.testing.assert_close(noise, (1 - mask) * up_bg + 0.5 * mask * up_fg)


def test_dp_sni_shapes_and_attention() -> None:
    module = _built()
    features = module.model.embedder(_images(2))
    out = module.model.dp_sni(features, (64, 64))
    assert out.noise.shape == (2, 3, 64, 64)
    assert out.mask.shape == (2, 1, 64, 64)
    assert out.foreground_attention.shape == (2, 1, *features.shape[-2:])
    assert 0 <= out.foreground_attention.min() and out.foreground_attention.max() <= 1
    match = module.model.dp_sni.matcher(features)
    torch.testing.assert_close(match.foreground_attention + match.background_attention, torch.ones_like(match.background_attention))
    assert match.background.shape == match.foreground.shape == features.shape


def test_seeded_structured_noise_is_reproducible_and_batch_independent() -> None:
    module = _built().eval()
    images = _images(3)
    features = module.model.embedder(images)
    a = module.model.dp_sni(features, (64, 64), torch.Generator().manual_seed(1)).noise
    b = module.model.dp_sni(features[:1], (64, 64), torch.Generator().manual_seed(1)).noise
    torch.testing.assert_close(a[:1], b)


# --- RHN-Loss (Eqs. 22-28) --------------------------------------------------------------------
def test_rhn_loss_matches_a_hand_computed_case() -> None:
    loss = RHNLoss(alpha=0.0, beta=math.log(3.0), background_weight=0.5, snr_clamp=2.0)
    predicted = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    structured = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 2, 2)  # variance 4/3 (unbiased)
    ideal = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    out = loss(predicted, structured, ideal, mask, snr=torch.tensor([10.0]))
    struct = torch.tensor([0.0, 1.0, 1.0, 1.0]) / (2 * 4 / 3)
    eps = torch.tensor([1.0, 0.0, 0.0, 0.0])
    spatial = torch.tensor([0.75, 0.5, 0.5, 0.5])  # sigmoid(log 3) = 0.75 inside, c = 0.5 outside
    expected = 2.0 * ((0.5 * struct + 0.5 * eps) * spatial).mean()  # w(t) = min(10, 2)
    torch.testing.assert_close(out["loss"], expected)


def test_snr_weight_is_clamped_and_the_cosine_schedule_is_used() -> None:
    loss = RHNLoss(snr_clamp=5.0)
    torch.testing.assert_close(loss.timestep_weight(torch.tensor([0.1, 5.0, 1e4])), torch.tensor([0.1, 5.0, 5.0]))
    schedule = Dpnr(**TINY_DPNR).model.schedule
    t = torch.tensor([250, 500, 750])
    expected = torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # Eq. 25 with diffusers' small offset
    torch.testing.assert_close(schedule.alphas_cumprod[t], expected.float(), atol=2e-3, rtol=0)
    snr = schedule.snr(torch.tensor([0, 999]))
    assert loss.timestep_weight(snr)[0] == 5.0 and loss.timestep_weight(snr)[1] < 1e-3


def test_rhn_weights_are_learnable_and_trained() -> None:
    module = _built()
    assert {name for name, p in module.loss.named_parameters() if p.requires_grad} == {"alpha", "beta"}
    optimised = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert id(module.loss.alpha) in optimised and id(module.model.dp_sni.matcher.foreground_prototypes) in optimised
    assert not any(id(p) in optimised for p in module.model.embedder.parameters())  # Phi is frozen


# --- model ------------------------------------------------------------------------------------
def _training_output(module: Dpnr, seed: int = 0) -> tuple[DpnrOutput, dict[str, torch.Tensor], torch.Tensor]:
    """One training forward on ``_images``; returns the output, the loss terms and the anomalous images."""
    images = _images(4)
    anomalous, masks = module.repository_generator(to_unit_range(images))
    anomalous = from_unit_range(anomalous)
    torch.manual_seed(seed)
    output = module.model.train()(images, anomalous, masks)
    return output, module.loss(output.predicted, output.structured, output.ideal, output.mask, output.snr), anomalous


def test_training_outputs_and_ideal_noise_recovers_the_normal_image() -> None:
    module = _built()
    output, losses, anomalous = _training_output(module)
    assert output.predicted.shape == output.structured.shape == output.ideal.shape == (4, 3, 64, 64)
    assert output.mask.shape == (4, 1, 64, 64) and output.mask.max() > 0
    assert torch.isfinite(losses["loss"])
    images = _images(4)
    schedule = module.model.schedule
    ratio = (output.timesteps.float() / 1000).view(-1, 1, 1, 1)
    abar = schedule.alphas_cumprod[output.timesteps].view(-1, 1, 1, 1)
    z_syn = (1 - ratio) * images + ratio * anomalous  # Eq. 12
    torch.testing.assert_close(output.noisy, abar.sqrt() * z_syn + (1 - abar).sqrt() * output.structured)  # Eq. 4
    # x_t = sqrt(abar) z_s + sqrt(1 - abar) eps*: Eq. 5 with the ideal noise returns the normal image z_s,
    # which is what teaches the denoiser to remove defects
    torch.testing.assert_close(abar.sqrt() * images + (1 - abar).sqrt() * output.ideal, output.noisy, atol=1e-4, rtol=0)


def test_inference_gives_an_inference_batch() -> None:
    module = _built().eval()
    with torch.no_grad():
        out = module(_images(2))
    assert isinstance(out, InferenceBatch)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 1, 64, 64)
    with torch.no_grad():
        again = module(_images(2))
    assert torch.equal(out.pred_score, again.pred_score)


def _unbatched_discrepancy(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel and feature maps level by level, every level from scratch (what the batched inference must equal)."""
    latents = model.codec.encode(images)
    maps = []
    for index, step in enumerate(model.inference_timesteps):
        noise, _ = model.inject(images, latents, torch.Generator().manual_seed(model.inference_seed + index))
        maps.append(model.discrepancy(images, model.reconstruct(latents, noise, torch.full((len(images),), step))))
    pixel, feature = zip(*maps)
    return sum(pixel) / len(pixel), sum(feature) / len(feature)


@pytest.mark.parametrize("variant", [{}, {"structured_noise": False}, {"dp_sni": False}])
def test_batched_inference_equals_level_by_level(variant: dict[str, bool]) -> None:
    model = _built(**variant, feature_weight=1.0).eval().model
    images = _images(3)
    with torch.no_grad():
        torch.testing.assert_close(model.mean_discrepancy(images), _unbatched_discrepancy(model, images), atol=1e-5, rtol=0)


def test_image_score_comes_from_the_chosen_map() -> None:
    module = _built(pixel_weight=1.0, feature_weight=1.0).eval()
    images = _images(2)
    model = module.model
    with torch.no_grad():
        pixel, feature = model.mean_discrepancy(images)
        out = model(images)
        model.score_from = "map"
        by_map = model(images)
    blur, k = model.scorer.blur, model.scorer.top_k
    torch.testing.assert_close(out.anomaly_map, blur(pixel + feature))  # the map always holds both terms
    torch.testing.assert_close(out.pred_score, topk_mean(blur(pixel), k))
    torch.testing.assert_close(by_map.pred_score, topk_mean(blur(pixel + feature), k))
    with pytest.raises(ValueError, match="score_from"):
        Dpnr(**TINY_DPNR, score_from="max")


def test_training_without_a_repository_fails_clearly() -> None:
    module = Dpnr(**TINY_DPNR)
    images = _images(2)
    with pytest.raises(RuntimeError, match="repository is empty"):
        module.model.train()(images, images, torch.zeros(2, 1, 64, 64))


def test_loss_decreases_when_overfitting_a_few_images() -> None:
    module = _built(learning_rate=2e-3)
    optimizer = module.configure_optimizers()
    images = _images(4)
    torch.manual_seed(0)
    anomalous, masks = module.repository_generator(to_unit_range(images))
    anomalous = from_unit_range(anomalous)
    module.model.train()
    history = []
    for _ in range(40):
        torch.manual_seed(0)  # the same noise and timesteps every step: the loss curve is comparable
        output = module.model(images, anomalous, masks)
        loss = module.loss(output.predicted, output.structured, output.ideal, output.mask, output.snr)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-4:]) < 0.3 * sum(history[:4])  # measured: about 0.17 -> 0.01


def test_injection_loss_matches_a_hand_computed_case() -> None:
    attention = torch.tensor([[[[0.5, 0.9], [0.1, 0.5]]]])
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    zeros = torch.zeros(1, 1, 2, 2)
    background = (zeros, torch.full((1, 1, 2, 2), math.log(4.0)))  # N(0, 4)
    foreground = (torch.ones(1, 1, 2, 2), zeros)  # N(1, 1)
    real_bg = torch.tanh(torch.tensor([[[[0.0, 0.0], [2.0, -2.0]]]]))  # u = atanh(r / C) with C = 1
    real_fg = torch.tanh(torch.tensor([[[[1.0, 3.0], [0.0, 0.0]]]]))
    out = InjectionLoss(noise_scale=1.0, nll_weight=1.0, mask_weight=1.0, kl_weight=2.0, max_ratio=0.999)(
        NoiseParameters(attention, background, foreground), torch.tensor([0.2, 0.4]), real_bg, real_fg, mask
    )
    bce = -(math.log(0.5) + math.log(0.9) + math.log(0.9) + math.log(0.5)) / 4
    nll_bg = 0.5 * (math.log(4.0) + 4.0 / 4.0)  # both background pixels at u = +-2
    nll_fg = 0.5 * (0.0 + (0.0 + 4.0) / 2)  # foreground pixels at u = 1 and 3 around mu = 1
    assert out["mask_bce"].item() == pytest.approx(bce, rel=1e-5)
    assert out["nll"].item() == pytest.approx(nll_bg + nll_fg, rel=1e-4)
    assert out["loss"].item() == pytest.approx(nll_bg + nll_fg + bce + 2.0 * 0.3, rel=1e-4)
    # KL(N(mu, sigma^2) || N(0, 1)) is 0 at the prior and 0.5 mu^2 for unit variance
    assert DPSNI.kl_divergence(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == 0
    assert DPSNI.kl_divergence(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == pytest.approx(0.5)


def _injection_losses(module: Dpnr) -> dict[str, torch.Tensor]:
    """The full training loss of one batch, as ``Dpnr.training_step`` computes it."""
    output, losses, _ = _training_output(module)
    injection = module.injection_loss(output.dp_sni.parameters, output.dp_sni.kl, output.background_noise, output.foreground_noise, output.mask)
    return {**injection, "loss": losses["loss"] + injection["loss"]}


def test_every_dp_sni_parameter_trains_under_the_default_config() -> None:
    module = _built()  # detach_noise true: the denoiser's loss does not reach DP-SNI, its own objective does
    _injection_losses(module)["loss"].backward()
    for name, parameter in module.model.dp_sni.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"DP-SNI parameter {name} gets no gradient"


def test_dp_sni_reads_the_image_that_carries_the_defect() -> None:
    module = _built()
    output, _, anomalous = _training_output(module)
    expected = module.model.dp_sni.parameterize(module.model.embedder(anomalous)).foreground_attention
    torch.testing.assert_close(output.dp_sni.foreground_attention, expected)
    # what Psi_bg and Psi_fg imitate: the normal latent's residual, and the defect inside its mask, both unit variance
    torch.testing.assert_close(output.background_noise, module.model.raw_noise(_images(4)))
    inside = output.mask.expand_as(output.foreground_noise) > 0
    assert torch.allclose(output.foreground_noise[inside].pow(2).mean(), torch.tensor(1.0), atol=0.2)


def test_dp_sni_training_fits_the_real_noise() -> None:
    module = _built()
    optimizer = torch.optim.Adam(module.model.dp_sni.parameters(), lr=1e-2)
    images = _images(4)
    torch.manual_seed(0)
    anomalous, masks = module.repository_generator(to_unit_range(images))
    history = []
    for _ in range(40):
        torch.manual_seed(0)
        output = module.model.train()(images, from_unit_range(anomalous), masks)
        injection = module.injection_loss(output.dp_sni.parameters, output.dp_sni.kl, output.background_noise, output.foreground_noise, output.mask)
        optimizer.zero_grad()
        injection["loss"].backward()
        optimizer.step()
        history.append((injection["nll"].item(), injection["mask_bce"].item()))
    last = torch.tensor(history[-5:]).mean(dim=0)
    assert last[0] < 0.9 * history[0][0] and last[1] < 0.5 * history[0][1]  # likelihood of the real noise and A_fg's BCE


@pytest.mark.parametrize("part", ["matcher.query", "matcher.key", "matcher.foreground_prototypes", "background_parameterizer", "foreground_parameterizer"])
def test_every_dp_sni_part_changes_the_anomaly_map(part: str) -> None:
    module = _built().eval()
    images = _images(2)
    with torch.no_grad():
        before = module.model(images).anomaly_map
        for name, parameter in module.model.dp_sni.named_parameters():
            if name.startswith(part):
                parameter.add_(0.5 * torch.randn_like(parameter))
        after = module.model(images).anomaly_map
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("detach", [True, False])
def test_denoiser_loss_reaches_dp_sni_only_when_not_detached(detach: bool) -> None:
    module = _built(detach_noise=detach)
    _, losses, _ = _training_output(module)
    losses["loss"].backward()
    grad = module.model.dp_sni.background_parameterizer.net[-1].weight.grad
    assert (grad is None or not grad.any()) if detach else grad.abs().sum() > 0


# --- ablation switches (Table 2) ---------------------------------------------------------------
def test_structured_noise_off_injects_gaussian_noise_on_dp_sni_s_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _built(structured_noise=False)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("DP-SNI must not run when structured_noise is off")

    monkeypatch.setattr(module.model.dp_sni, "forward", fail)
    output, _, _ = _training_output(module)
    torch.manual_seed(0)
    module.model.schedule.sample_timesteps(4, torch.device("cpu"))
    grid = module.model.embedder(_images(1)).shape[-2:]  # DP-SNI's noise bases live on the feature grid
    expected = torch.nn.functional.interpolate(torch.randn(4, 3, *grid), size=(64, 64), mode="bicubic")
    torch.testing.assert_close(output.structured, expected)
    assert not Dpnr(**TINY_DPNR, structured_noise=False).model.needs_repository


def test_dp_sni_off_injects_the_raw_noise_of_the_corrupted_image() -> None:
    module = _built(dp_sni=False)
    output, _, anomalous = _training_output(module)
    torch.testing.assert_close(output.structured, module.model.raw_noise(anomalous))  # training: the defective image
    assert torch.allclose(output.structured.flatten(1).std(dim=1), torch.ones(4), atol=1e-4)
    images = _images(2)
    latents = module.model.codec.encode(images)
    torch.testing.assert_close(module.model.level_noises(images, latents)[0], module.model.raw_noise(latents))  # inference: the test image


def test_rhn_loss_off_uses_the_standard_epsilon_loss() -> None:
    module = _built(rhn_loss=False)
    assert isinstance(module.loss, EpsilonLoss)
    output, losses, _ = _training_output(module)
    torch.testing.assert_close(losses["loss"], torch.nn.functional.mse_loss(output.predicted, output.structured))
    with_rhn = _built()
    _, rhn_losses, _ = _training_output(with_rhn)
    assert not torch.isclose(losses["loss"], rhn_losses["loss"])


# --- checkpoints, weights, latent space ---------------------------------------------------------
def _saved(module: Dpnr, path: Path) -> Path:
    """``module`` written to ``path`` as a Lightning checkpoint (what ``fit`` writes)."""
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_reload_restores_repository_and_predictions(tmp_path: Path) -> None:
    module = _built().eval()
    path = _saved(module, tmp_path / "dpnr.ckpt")
    reloaded = Dpnr.load_from_checkpoint(path).eval()
    for name in ("foreground", "background"):
        assert torch.equal(getattr(reloaded.model.repository, name).prototypes, getattr(module.model.repository, name).prototypes)
    with torch.no_grad():
        a, b = module(_images(2)), reloaded(_images(2))
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_checkpoint_reloads_with_another_smoothing_and_with_saved_blur_kernels(tmp_path: Path) -> None:
    module = _built().eval()
    path = _saved(module, tmp_path / "dpnr.ckpt")
    assert not any(key.endswith("blur.kernel") for key in torch.load(path, weights_only=False)["state_dict"])
    smoother = Dpnr.load_from_checkpoint(path, smoothing_sigma=8.0)
    assert smoother.model.scorer.blur.kernel.shape[-1] == 65  # the kernel of the new sigma, not the saved one
    checkpoint = torch.load(path, weights_only=False)  # as older checkpoints were: blur kernels saved with the weights
    checkpoint["state_dict"]["model.scorer.blur.kernel"] = module.model.scorer.blur.kernel
    torch.save(checkpoint, tmp_path / "old.ckpt")
    reloaded = Dpnr.load_from_checkpoint(tmp_path / "old.ckpt").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(_images(2)).anomaly_map, module(_images(2)).anomaly_map)


def test_missing_backbone_weights_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError, match="anomalib-dpnr weights install efficientnet_lite0"):
        Dpnr(**{**TINY_DPNR, "pre_trained": True})
    with pytest.raises(MissingWeightsError, match="not found"):
        Dpnr(**{**TINY_DPNR, "pre_trained": False, "backbone_weights": str(tmp_path / "nope.pth")})


def test_latent_space_from_a_local_vae_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    module = _built(vae_path=str(tmp_path / "vae"))
    assert module.model.codec.channels == 4 and module.model.codec.factor == 2
    output, losses, _ = _training_output(module)
    assert output.predicted.shape == (4, 4, 32, 32) and torch.isfinite(losses["loss"])
    with torch.no_grad():
        assert module.eval()(_images(2)).anomaly_map.shape == (2, 1, 64, 64)
    assert not any(p.requires_grad for p in module.model.codec.parameters())
    with pytest.raises(MissingWeightsError, match="VAE folder not found"):
        Dpnr(**{**TINY_DPNR, "vae_path": str(tmp_path / "missing")})


def test_bad_input_is_named() -> None:
    model = _built().model.eval()
    with pytest.raises(ValueError, match="channel"):
        model(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 3, 60, 60))


def test_inference_sweep_reads_the_maps_as_predict_does() -> None:
    """The sweep's metrics for a setting equal those of ``predict`` run with that setting."""
    from sklearn.metrics import roc_auc_score

    sweep = benchmark_script("dpnr_inference")
    module = _built().eval()
    images, labels = _images(4), torch.tensor([0, 0, 1, 1])
    masks = torch.zeros(4, 1, 64, 64, dtype=torch.bool)
    masks[2:, :, 8:24, 8:24] = True
    with torch.no_grad():
        pixel, feature = module.model.mean_discrepancy(images)
        for weights, score_from, sigma in (((1.0, 1.0), "pixel", 4.0), ((1.0, 2.0), "map", 2.0), ((0.0, 1.0), "map", 0.0)):
            module.model.pixel_weight, module.model.feature_weight = weights
            module.model.score_from = score_from
            module.model.scorer = AnomalyScorer(sigma, module.model.scorer.top_k)
            out = module.model(images)
            module.model.scorer = AnomalyScorer(1.0, module.model.scorer.top_k)  # the sweep must set its own sigma
            got = sweep.scores(module, pixel, feature, labels, masks, weights, score_from, sigma)
            assert got["image_AUROC"] == round(float(roc_auc_score(labels, out.pred_score)), 4)
            assert got["pixel_AUROC"] == round(float(roc_auc_score(masks.ravel(), out.anomaly_map.ravel())), 4)


def test_inference_sweep_render_picks_the_best_validation_setting(tmp_path: Path) -> None:
    import csv

    sweep = benchmark_script("dpnr_inference")
    rows = []
    for index, (timesteps, weights, sigma, score_from, split) in enumerate(
        (t, w, g, s, split) for t in ("100", "100 200") for w in sweep.WEIGHTS for g in sweep.SIGMAS
        for s in ("pixel", "map") for split in ("val", "test")
    ):
        best = (timesteps, weights, sigma, score_from) == ("100", (1.0, 0.0), 2.0, "pixel")
        rows.append({"inference_timesteps": timesteps, "pixel_weight": weights[0], "feature_weight": weights[1],
                     "smoothing_sigma": sigma, "score_from": score_from, "split": split, "image_AUROC": 0.5,
                     "pixel_AUROC": 0.9 if best else 0.6 + index / 1000, "pixel_AUPRO": 0.3,
                     "checkpoint_setting": (timesteps, weights, sigma, score_from) == ("100 200", (1.0, 1.0), 4.0, "pixel")})  # fmt: skip
    table = tmp_path / "sweep.csv"
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:dpnr_inference -->\nold\n<!-- /bench:dpnr_inference -->\ny\n")
    assert sweep.main(["--render", "--csv", str(table), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("x\n") and text.endswith("y\n")
    assert "| best on val (pixel AUROC): levels 100, 1 pix + 0 feat, sigma 2, score from pixel | test | 0.5 | 0.9 | 0.3 |" in text
    assert "| checkpoint's own: levels 100 200, 1 pix + 1 feat, sigma 4, score from pixel | val |" in text
    assert sweep.main(["--csv", str(table), "--ckpt", str(tmp_path / "missing.ckpt")]) == 2


def test_inference_sweep_chooses_on_the_mean_over_checkpoints(tmp_path: Path) -> None:
    """With several checkpoints (seeds), a setting that wins on one seed only does not win on the mean."""
    import csv

    sweep = benchmark_script("dpnr_inference")
    settings = [(t, w, 4.0, f) for t in ("100", "200") for w in sweep.WEIGHTS for f in ("pixel", "map")]
    # with the first map terms: seed a "100" 0.95, "200" 0.90; seed b "100" 0.70, "200" 0.85 -> means 0.825 / 0.875
    pixel = {("a", "100"): 0.95, ("a", "200"): 0.90, ("b", "100"): 0.70, ("b", "200"): 0.85}
    rows = [{"inference_timesteps": t, "pixel_weight": w[0], "feature_weight": w[1], "smoothing_sigma": g, "score_from": f,
             "split": split, "image_AUROC": 0.6 if f == "pixel" else 0.5,
             "pixel_AUROC": pixel[ckpt, t] if w == sweep.WEIGHTS[0] else 0.5, "pixel_AUPRO": 0.3,
             "checkpoint_setting": (t, w, f) == ("100", sweep.WEIGHTS[0], "pixel"), "checkpoint": ckpt}
            for ckpt in "ab" for t, w, g, f in settings for split in ("val", "test")]  # fmt: skip
    table = tmp_path / "sweep.csv"
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=sweep.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    averaged, count = sweep.mean_over_checkpoints(rows)
    assert count == 2 and len(averaged) == 2 * len(settings)
    assert next(r for r in averaged if r["inference_timesteps"] == "200" and r["split"] == "val")["pixel_AUROC"] == 0.875
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:dpnr_inference -->\n<!-- /bench:dpnr_inference -->\n")
    assert sweep.main(["--render", "--csv", str(table), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "mean over 2 checkpoints" in text
    assert "| best on val (pixel AUROC): levels 200, 1 pix + 0.1 feat, sigma 4, score from pixel | test | 0.6 | 0.875 | 0.3 |" in text
    assert "| checkpoint's own: levels 100, 1 pix + 0.1 feat, sigma 4, score from pixel | val | 0.6 | 0.825 | 0.3 |" in text
    with pytest.raises(ValueError, match="same settings"):
        sweep.mean_over_checkpoints(rows[:-1])


# --- the map's feature weight, chosen on the validation split ------------------------------------------------
def test_weight_choice_follows_the_validation_masks() -> None:
    from anomalib_dpnr.components.term_weights import best_weight, check_weights, weight_scores

    masks = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    masks[:, :, 4:9, 4:9] = True
    base = torch.rand(masks.shape, generator=torch.Generator().manual_seed(0)) * 2 + masks.float()  # separates partly
    choices = (0.0, 0.1, 1.0)
    assert best_weight(weight_scores(base, masks.float(), masks, choices)) == 1.0  # a term that marks the defects
    assert best_weight(weight_scores(base, -5 * masks.float(), masks, choices)) == 0.0  # one that hides them
    assert best_weight(weight_scores(base, torch.zeros_like(base), masks, (0.1, 0.0, 1.0))) == 0.1  # ties: first listed
    with pytest.raises(ValueError, match="both anomalous and normal"):
        weight_scores(base, base, torch.zeros_like(masks), choices)
    for bad in ([0.1], [0.1, 0.1], [-1.0, 0.0]):
        with pytest.raises(ValueError, match="feature_weight_choices"):
            check_weights(bad, "feature_weight_choices")


def test_weight_choice_does_not_trade_small_defects_for_pixel_auroc() -> None:
    """A term that lights up one large defect and hides three small ones raises pixel AUROC (pixel-weighted) but
    lowers PRO (region-weighted): it is not chosen."""
    from anomalib_dpnr.components.term_weights import best_weight, weight_scores

    large, small = torch.zeros(4, 1, 32, 32), torch.zeros(4, 1, 32, 32)
    large[0, :, 4:24, 4:24] = 1
    for i in (1, 2, 3):
        small[i, :, 10:12, 10:12] = 1
    masks = (large + small) > 0
    base = torch.rand(masks.shape, generator=torch.Generator().manual_seed(0)) + 0.5 * masks.float()
    scores = weight_scores(base, large - 3 * small, masks, (0.0, 1.0))
    assert scores[1.0][0] > scores[0.0][0] and scores[1.0][1] < scores[0.0][1]  # AUROC up, PRO down
    assert best_weight(scores) == 0.0


def test_feature_weight_is_fitted_on_the_validation_split_and_saved(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import roc_auc_score

    choices = (0.0, 0.1, 1.0)
    module = _built(feature_weight=0.5, feature_weight_choices=choices)
    data = MVTecAD(root=tiny_dataset, category="woven", eval_batch_size=4, num_workers=0, val_split_mode="from_test", val_split_ratio=0.5, seed=0)
    data.setup()
    model = module.eval().model
    terms, masks = [], []
    with torch.no_grad():  # the choice, computed here from the validation maps and sklearn's AUROC
        for batch in data.val_dataloader():
            images, gt_mask = module.pre_processor.transform(batch.image, batch.gt_mask)
            terms.append([model.scorer.blur(t) for t in model.mean_discrepancy(images, features=True)])
            masks.append(gt_mask.flatten())
    pixel, feature = (torch.cat(t) for t in zip(*terms, strict=True))
    masks = torch.cat(masks).view(pixel.shape).bool()

    def localisation(weight: float) -> float:  # pixel AUROC (sklearn's) + PRO (anomalib's, as its evaluator)
        pro = _AUPRO()
        pro.update((pixel + weight * feature)[:, 0], masks[:, 0].int())
        return roc_auc_score(masks.flatten().numpy(), (pixel + weight * feature).flatten().numpy()) + float(pro.compute())

    expected = max(choices, key=localisation)

    calls = []
    discrepancy = model.mean_discrepancy
    monkeypatch.setattr(model, "mean_discrepancy", lambda *a, **k: calls.append(k) or discrepancy(*a, **k))
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    engine.validate(model=module, datamodule=data)
    assert module.model.feature_weight == expected
    assert len(calls) == len(data.val_dataloader())  # validation scored the kept maps instead of computing them again

    path = tmp_path / "dpnr.ckpt"
    engine.trainer.save_checkpoint(path)
    assert Dpnr.load_from_checkpoint(path).model.feature_weight == expected
    fixed = Dpnr.load_from_checkpoint(path, feature_weight=0.5, feature_weight_choices=None)
    assert fixed.model.feature_weight == 0.5  # without choices the configured weight stands


@torch.no_grad()
def test_positional_statistics_come_from_training_images_and_change_the_map(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _built()
    assert not plain.fits_statistics  # the raw terms: nothing to fit
    module = _built(positional_statistics=True, statistics_images=4).eval()
    assert module.fits_statistics
    module.fit_statistics(module.training_set)
    model, batch = module.model, _images(2, seed=3)
    statistics = model.normaliser
    assert bool(statistics.fitted) and statistics.position_mean.shape == (2, 64, 64)
    expected = torch.stack(model.mean_discrepancy(_images(4), features=True)).mean(dim=1)[:, 0]  # the first 4 training images
    torch.testing.assert_close(statistics.position_mean, expected, atol=1e-5, rtol=1e-4)
    pixel, feature = model.mean_discrepancy(batch, features=True)
    positional = model.score_maps(pixel, feature)
    model.positional_statistics = False
    raw = model.score_maps(pixel, feature)
    assert not torch.allclose(positional.anomaly_map, raw.anomaly_map)
    standardised = statistics(pixel, 0, "position") * model.pixel_weight + model.feature_weight * statistics(feature, 1, "position")
    torch.testing.assert_close(positional.anomaly_map, model.scorer.blur(standardised))
    with pytest.raises(ValueError, match="statistics_images must be >= 1"):
        Dpnr(**TINY_DPNR, positional_statistics=True, statistics_images=0)


def test_testing_without_fitted_statistics_warns_only_when_they_are_read(tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    data = MVTecAD(root=tiny_dataset, category="woven", eval_batch_size=4, num_workers=0, val_split_mode="from_test", val_split_ratio=0.5, seed=0)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match="map-normalisation statistics are not fitted"):
        engine.test(model=_built(positional_statistics=True, feature_weight_choices=None), datamodule=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.test(model=_built(feature_weight_choices=None), datamodule=data)
    assert not any("statistics are not fitted" in str(w.message) for w in caught)  # raw terms read no statistics


def test_feature_weight_stays_without_validation_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.data import ImageBatch

    module = _built(feature_weight=0.5).eval()
    batches = [ImageBatch(image=_images(2), gt_label=torch.zeros(2, dtype=torch.bool), image_path=["a.png", "b.png"])]
    monkeypatch.setattr(module, "validation_batches", lambda: iter(batches))
    with pytest.warns(UserWarning, match="feature_weight stays 0.5"):
        module.fit_weight()
    assert module.model.feature_weight == 0.5
