"""RAN (issue 17): KL score, learned variance, respacing, ensemble normalisation, gradient denoising, fitted state."""

from __future__ import annotations

import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import TINY_RAN, config_file
from test_reliability import datamodule, engine, sample_images

from anomalib_dpnr import Ran
from anomalib_dpnr.components import NoiseSchedule
from anomalib_dpnr.components.features import FeatureEmbedder
from anomalib_dpnr.components.statistics import MapAccumulator, MapStatistics
from anomalib_dpnr.models.ran.ensemble import ensemble
from anomalib_dpnr.models.ran.kl_score import discretized_gaussian_nll, normal_kl, variational_terms
from anomalib_dpnr.models.ran.torch_model import RanModel

MODEL_ARGS = {k: v for k, v in TINY_RAN.items() if k not in {"image_size", "statistics_images"}}


def tiny_model(**overrides: object) -> RanModel:
    torch.manual_seed(0)
    return RanModel(**{**MODEL_ARGS, **overrides}).eval()


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fitted_model(**overrides: object) -> RanModel:
    """A tiny model whose guidance Gaussian is fitted on smooth images (the 'normal' distribution)."""
    model = tiny_model(**overrides)
    normal = torch.nn.functional.avg_pool2d(images(8, seed=3), 9, stride=1, padding=4)
    model.guide.fit(model.guidance_embedding(normal))
    return model


# --- schedule: posterior, learned variance, respacing -------------------------------------------------------
def test_learned_variance_interpolates_between_beta_and_posterior_variance() -> None:
    schedule = NoiseSchedule(1000, "linear", 1e-4, 0.02)
    abar = schedule.alphas_cumprod.double()
    t = torch.tensor([1, 10, 500, 999])
    beta = 1 - abar[t] / abar[t - 1]
    beta_tilde = beta * (1 - abar[t - 1]) / (1 - abar[t])
    ones = torch.ones(4, 1, 1, 1)
    torch.testing.assert_close(schedule.learned_log_variance(ones, t).flatten(), beta.log().float())  # v = 1
    torch.testing.assert_close(schedule.learned_log_variance(-ones, t).flatten(), beta_tilde.log().float())  # v = -1
    half = schedule.learned_log_variance(0.5 * ones, t).flatten()  # v = 0.5: weight 3/4 on log beta
    torch.testing.assert_close(half, (0.75 * beta.log() + 0.25 * beta_tilde.log()).float())
    # at t = 0 the posterior variance is 0: improved DDPM clips its log to that of t = 1
    assert schedule.learned_log_variance(-ones[:1], torch.tensor([0])).item() == pytest.approx(schedule.posterior_log_variance[1].item())


def test_posterior_is_the_ddpm_closed_form() -> None:
    schedule = NoiseSchedule(1000)
    abar = schedule.alphas_cumprod.double()
    x0, x_t = images(1, seed=1), images(1, seed=2)
    t = 300
    beta = 1 - abar[t] / abar[t - 1]
    expected = (abar[t - 1].sqrt() * beta / (1 - abar[t])) * x0 + ((1 - beta).sqrt() * (1 - abar[t - 1]) / (1 - abar[t])) * x_t
    mean, _ = schedule.posterior(x0, x_t, torch.tensor([t]))
    torch.testing.assert_close(mean, expected.float())
    first, _ = schedule.posterior(x0, x_t, torch.tensor([0]))  # q(x_{-1} | x_0, x_0): the image itself
    torch.testing.assert_close(first, x0)


def test_respacing_keeps_the_chosen_steps_alphas() -> None:
    schedule = NoiseSchedule(1000)
    respaced, steps = schedule.respace(250)
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps[5] == round(5 * 999 / 249)
    torch.testing.assert_close(respaced.alphas_cumprod, schedule.alphas_cumprod[steps], rtol=1e-5, atol=1e-7)
    assert respaced.betas[100] > 3 * schedule.betas[int(steps[100])]  # one respaced step spans ~4 original steps
    with pytest.raises(ValueError, match="respacing must lie in"):
        schedule.respace(1001)


# --- KL score ------------------------------------------------------------------------------------------------
def test_gaussian_kl_hand_computed() -> None:
    # KL(N(0, 1) || N(1, 4)) = 0.5 (log 4 + 1/4 + 1/4 - 1)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(0.5 * (math.log(4) - 0.5), abs=1e-6)
    assert normal_kl(torch.tensor(0.3), torch.tensor(-2.0), torch.tensor(0.3), torch.tensor(-2.0)).item() == 0


def test_kl_score_is_zero_when_the_model_posterior_is_the_true_one() -> None:
    schedule = NoiseSchedule(1000)
    x0 = images(1) * 0.5
    noise = torch.randn_like(x0)
    t = torch.tensor([200])
    x_t = schedule.add_noise(x0, noise, t)
    posterior_variance = -torch.ones_like(x0)  # v = -1: the learned variance is the posterior's
    exact = variational_terms(schedule, noise, posterior_variance, x0, x_t, t)
    assert exact.abs().max() < 1e-4
    # a noise error d moves the predicted x0 by -sqrt(1 - abar)/sqrt(abar) d and the mean by coef_x0 times that
    delta = 0.1
    wrong = variational_terms(schedule, noise + delta, posterior_variance, x0, x_t, t)
    abar = schedule.alphas_cumprod[200].double()
    shift = schedule.posterior_coef_x0[200].double() * (1 - abar).sqrt() / abar.sqrt() * delta
    expected = shift**2 / (2 * schedule.posterior_log_variance[200].double().exp()) / math.log(2)  # bits
    torch.testing.assert_close(wrong, torch.full_like(wrong, float(expected)), rtol=1e-3, atol=1e-5)
    assert wrong.min() > 0
    # a wrong variance alone is penalised too
    assert variational_terms(schedule, noise, torch.ones_like(x0), x0, x_t, t).min() > 0


def test_step_zero_scores_the_decoder_likelihood() -> None:
    schedule = NoiseSchedule(1000)
    x0 = (torch.randint(0, 256, (1, 3, 4, 4)).float() / 127.5 - 1).clamp(-1, 1)
    t = torch.tensor([0])
    x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
    eps = (x_t - schedule.alphas_cumprod[0].sqrt() * x0) / (1 - schedule.alphas_cumprod[0]).sqrt()  # the exact noise
    values = -torch.ones_like(x0)
    terms = variational_terms(schedule, eps, values, x0, x_t, t)
    mean, log_var = schedule.posterior(schedule.predict_x0(x_t, eps, t), x_t, t)[0], schedule.learned_log_variance(values, t)
    torch.testing.assert_close(terms, discretized_gaussian_nll(x0, mean, log_var) / math.log(2))
    # a sharp decoder centred on the pixel puts almost all its mass in the pixel's bin
    sharp = discretized_gaussian_nll(torch.zeros(1), torch.zeros(1), torch.tensor([math.log(1e-6)]))
    assert sharp.item() < 1e-3


# --- ensemble -------------------------------------------------------------------------------------------------
def test_ensemble_uses_the_stored_statistics() -> None:
    normaliser = MapStatistics((2, 2), (2, 2))
    normaliser.fit({
        "low": torch.zeros(2, 2), "high": torch.ones(2, 2),
        "mean": torch.tensor([[1.0, 10.0], [0.5, 0.0]]), "std": torch.tensor([[2.0, 5.0], [0.25, 1.0]]),
        "position_mean": torch.zeros(2, 2, 2, 2), "position_std": torch.ones(2, 2, 2, 2),
    })  # fmt: skip
    kl = torch.stack([torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 20.0)])
    feature = torch.stack([torch.full((1, 1, 2, 2), 1.0), torch.full((1, 1, 2, 2), 2.0)])
    # level 0: 0.25 * (3 - 1) / 2 + 0.75 * 1; level 1: 0.25 * (20 - 10) / 5 + 0.75 * 2; averaged
    expected = ((0.25 * 1 + 0.75) + (0.25 * 2 + 1.5)) / 2
    torch.testing.assert_close(ensemble(kl, feature, normaliser, 0.25, False), torch.full((1, 1, 2, 2), expected))
    # feature maps standardised too: level 0 (1 - 0.5) / 0.25 = 2, level 1 (2 - 0) / 1 = 2
    expected = ((0.25 * 1 + 0.75 * 2) + (0.25 * 2 + 0.75 * 2)) / 2
    torch.testing.assert_close(ensemble(kl, feature, normaliser, 0.25, True), torch.full((1, 1, 2, 2), expected))


def test_positional_ensemble_discounts_only_positions_high_on_normal_images() -> None:
    normal = torch.rand(2, 1, 6, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # [terms, levels, images, 1, H, W]
    normal[..., 0, 0] += 5.0  # high on every normal image at one position (a border, say)
    accumulator = MapAccumulator()
    accumulator.add(normal)
    normaliser = MapStatistics((2, 1), (4, 4), shrinkage=0.1)
    normaliser.fit(accumulator.result())
    test = torch.full((1, 1, 1, 4, 4), 0.5)
    test[..., 0, 0] = test[..., 2, 2] = 5.5  # the usual border value and a real anomaly of the same height
    per_level, per_position = (ensemble(test, test, normaliser, 0.5, True, reading)[0, 0] for reading in ("standard", "position"))
    assert per_level[0, 0] == per_level[2, 2]  # per level: the border looks as anomalous as the defect
    assert per_position[2, 2] > per_position[0, 0] + 5  # per position: only the defect stands out


def test_positional_statistics_switch_the_reading_of_one_fitted_model() -> None:
    model = tiny_model(image_size=64)
    accumulator = MapAccumulator()
    accumulator.add(torch.stack(model.level_maps(images(4, seed=5))))
    model.normaliser.fit(accumulator.result())
    assert model.normaliser.position_mean.shape == (2, 3, 64, 64)
    per_level = model.predict(images(1)).anomaly_map
    model.positional_statistics = True
    assert not torch.allclose(model.predict(images(1)).anomaly_map, per_level)
    module = Ran(**{**TINY_RAN, "positional_statistics": True})
    assert module.model.positional_statistics and "model.normaliser.position_std" in module.state_dict()
    wide = Ran(**{**TINY_RAN, "image_size": (64, 80)})  # the weights load at another size; the statistics keep theirs
    wide.load_state_dict(module.state_dict())
    assert wide.model.normaliser.size == (64, 64)


@torch.no_grad()
def test_scores_do_not_depend_on_the_batch() -> None:
    model = tiny_model()
    mean, std = torch.tensor([[0.1, 0.01, 0.001], [5.0, 5.0, 5.0]]), torch.tensor([[0.2, 0.02, 0.01], [2.0, 2.0, 2.0]])
    model.normaliser.mean.copy_(mean), model.normaliser.std.copy_(std)
    alone = model.predict(images(1, seed=1))
    outlier = torch.ones(1, 3, 64, 64)  # a batch statistic would move with it
    together = model.predict(torch.cat([images(1, seed=1), outlier]))
    torch.testing.assert_close(together.anomaly_map[:1], alone.anomaly_map, atol=1e-5, rtol=1e-5)
    kl, feature = model.level_maps(images(1, seed=1))
    model.normaliser.mean[0] += 1.0  # the stored statistics are what the map uses: each level's KL moves by 1 / std
    shifted = model.predict(images(1, seed=1)).anomaly_map
    shift = model.alpha * (1 / model.normaliser.std[0]).mean()
    torch.testing.assert_close(shifted, alone.anomaly_map - shift, atol=1e-3, rtol=0)  # the blur keeps constants
    assert kl.shape == feature.shape == (3, 1, 1, 64, 64)


def test_feature_head_reads_every_chunk_of_the_denoisers_cpu_inference() -> None:
    model = tiny_model()
    batch = images(5, seed=2)
    with torch.no_grad():
        model.denoiser.cpu_chunk = 0  # one pass over the batch
        whole = model.level_maps(batch)
        model.denoiser.cpu_chunk = 2  # three passes (2 + 2 + 1 images); the head sees all of them
        chunked = model.level_maps(batch)
    for expected, got in zip(whole, chunked, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- gradient denoising ---------------------------------------------------------------------------------------
def test_gradient_denoising_changes_the_reconstruction_and_lowers_the_mahalanobis_distance() -> None:
    model = fitted_model(guidance_iterations=20, denoise_every=5)
    anomalous = images(2, seed=4)  # noise images: far from the smooth training images
    reconstruction = model.reconstruct(anomalous)
    assert (reconstruction - anomalous).abs().mean() > 1e-2
    before, after = model.mahalanobis(anomalous), model.mahalanobis(reconstruction)
    assert (after < 0.9 * before).all(), (before, after)
    with torch.no_grad():
        off = model.predict(anomalous)
        model.gradient_denoising = True
        on = model.predict(anomalous)
    assert not torch.allclose(on.anomaly_map, off.anomaly_map)
    with torch.inference_mode():  # Lightning's test and predict loops: gradients are still taken
        again = model.reconstruct(anomalous)
    torch.testing.assert_close(again, reconstruction)


def test_gradient_denoising_without_the_diffusion_steps_is_plain_descent() -> None:
    model = fitted_model(guidance_iterations=6, denoise_every=100)  # never denoised: Eq. 13 with the paper's update
    anomalous = images(2, seed=4)
    distances = [model.mahalanobis(anomalous)]
    for iterations in (2, 6):
        model.guidance_iterations = iterations
        distances.append(model.mahalanobis(model.reconstruct(anomalous)))
    assert (distances[1] < distances[0]).all() and (distances[2] < distances[1]).all(), distances


# --- every trained component receives gradient and changes the output -----------------------------------------
@pytest.mark.parametrize("feature_layers", [["blocks.4"], ["blocks.2", "blocks.4"]])  # paper / CPU configs' targets
def test_each_component_gets_gradient_and_changes_the_map(feature_layers: list[str]) -> None:
    module = Ran(**TINY_RAN, seed=0, positional_statistics=True, normalise_features=True, feature_layers=feature_layers)
    model = module.model.train()
    output = model(images(4))
    losses = module.loss(output, model.schedule)
    losses["loss"].backward()
    for name, part in (("denoiser", model.denoiser), ("feature head", model.feature_head)):
        assert all(p.grad is not None for p in part.parameters()), name
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen
    # the VB term trains the variance channels only (stop-gradient on the mean, improved DDPM)
    fresh = model(images(4))
    vb = module.loss(fresh, model.schedule)["vb"]
    eps_grad, var_grad = torch.autograd.grad(vb, [fresh.eps, fresh.variance], allow_unused=True)
    assert eps_grad is None and var_grad is not None and var_grad.abs().sum() > 0
    model.eval()
    batch = images(2)
    with torch.no_grad():
        before = model.predict(batch).anomaly_map
        conv_out = model.denoiser.conv_out.weight
        conv_out[3:].mul_(1.5)  # the variance channels
        after_variance = model.predict(batch).anomaly_map
        conv_out[:3].mul_(1.5)  # the noise channels
        after_noise = model.predict(batch).anomaly_map
        head, start, after_layers = model.feature_head.head[-1].weight, 0, [after_noise]
        for layer in feature_layers:  # each target layer's output channels of the head
            width = model.backbone.channels[layer]
            head[start : start + width].mul_(1.5)
            after_layers.append(model.predict(batch).anomaly_map)
            start += width
    assert not torch.allclose(before, after_variance)
    assert not torch.allclose(after_variance, after_noise)
    assert start == head.shape[0]  # the head predicts every target layer's channels
    assert all(not torch.allclose(a, b) for a, b in itertools.pairwise(after_layers))


def test_feature_embedder_labels_layers_by_name_in_any_order() -> None:
    ordered = FeatureEmbedder(layers=["blocks.2", "blocks.4"], pre_trained=False)
    reversed_ = FeatureEmbedder(layers=["blocks.4", "blocks.2"], pre_trained=False)
    reversed_.load_state_dict(ordered.state_dict())
    x = images(1)
    a, b = ordered.layer_maps(x), reversed_.layer_maps(x)
    assert a[0].shape[1] == 40 and b[0].shape[1] == 112 and reversed_.channels == {"blocks.4": 112, "blocks.2": 40}
    torch.testing.assert_close(a[0], b[1])
    differentiable = images(1).requires_grad_(True)
    (grad,) = torch.autograd.grad(ordered.layer_maps(differentiable, differentiable=True)[1].sum(), differentiable)
    assert grad.abs().sum() > 0 and not any(p.requires_grad for p in ordered.parameters())


# --- one anomalib fit: fitted state and checkpoint --------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Ran, Path]:
    root = tmp_path_factory.mktemp("ran")
    module = Ran(**TINY_RAN, seed=0, positional_statistics=True, normalise_features=True)  # the CPU config's reading
    Engine(
        default_root_dir=root, max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, datamodule=datamodule(tiny_dataset))  # fmt: skip
    (checkpoint,) = root.glob("**/weights/lightning/model.ckpt")
    return module.eval(), checkpoint


def test_statistics_and_gaussian_come_from_training_images(trained: tuple[Ran, Path], tiny_dataset: Path) -> None:
    module, _ = trained
    assert bool(module.model.normaliser.fitted) and module.model.guide.is_fitted
    data = datamodule(tiny_dataset)
    data.setup()
    normaliser = module.model.normaliser
    fitted = {name: buffer.clone() for name, buffer in normaliser.named_buffers()}
    module.fit_statistics(data.train_data)
    for name, buffer in normaliser.named_buffers():
        torch.testing.assert_close(buffer, fitted[name])
    mean, std = fitted["mean"], fitted["std"]
    torch.testing.assert_close(normaliser.position_mean.mean(dim=(2, 3)), mean)  # the two kinds agree
    assert (std > 0).all() and mean[0, 0] > mean[0, -1]  # the KL shrinks with the noise level: why it is normalised
    gaussian = module.model.guide.gaussian.mean.clone()
    module.fit_guide(data.train_data)
    torch.testing.assert_close(module.model.guide.gaussian.mean, gaussian)


def test_statistics_and_gaussian_survive_the_checkpoint(trained: tuple[Ran, Path], tiny_dataset: Path) -> None:
    module, checkpoint = trained
    reloaded = Ran.load_from_checkpoint(checkpoint).eval()
    expected, got = module.state_dict(), reloaded.state_dict()
    for prefix in ("model.normaliser.", "model.guide.", "model.denoiser.", "model.feature_head."):
        keys = [k for k in expected if k.startswith(prefix)]
        assert keys and all(torch.equal(got[k], expected[k]) for k in keys), prefix
    assert reloaded.model.guide.gaussian.inv_covariance.numel() > 0 and bool(reloaded.model.normaliser.fitted)
    batch = sample_images(tiny_dataset)
    with torch.no_grad():
        a, b = module(batch), reloaded(batch)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)
    reloaded.model.gradient_denoising = True  # the stored Gaussian drives the guidance after a reload
    with pytest.raises(ValueError, match="gradient denoising cannot be exported"):
        reloaded.to_onnx(Path("unused"))


def test_alpha_is_chosen_on_the_validation_split_and_saved(trained: tuple[Ran, Path], tiny_dataset: Path, tmp_path: Path) -> None:
    from anomalib.metrics.aupro import _AUPRO
    from sklearn.metrics import roc_auc_score

    _, checkpoint = trained
    choices = (0.0, 0.5, 1.0)
    module = Ran.load_from_checkpoint(checkpoint, alpha=0.3, alpha_choices=choices).eval()
    model, data = module.model, datamodule(tiny_dataset)
    data.setup()
    maps, masks = {a: [] for a in choices}, []
    with torch.no_grad():  # the choice, computed here from Eq. 11's maps and sklearn's AUROC
        for batch in data.val_dataloader():
            batch_images, gt_mask = module.pre_processor.transform(batch.image, batch.gt_mask)
            kl, feature = model.level_maps(batch_images)
            for a in choices:
                maps[a].append(model.scorer.blur(ensemble(kl, feature, model.normaliser, a, True, "position")))
            masks.append(gt_mask.view(-1, 1, *gt_mask.shape[-2:]) > 0.5)
    masks = torch.cat(masks)

    def localisation(alpha: float) -> float:  # pixel AUROC (sklearn's) + PRO (anomalib's, as its evaluator)
        combined, pro = torch.cat(maps[alpha]), _AUPRO()
        pro.update(combined[:, 0], masks[:, 0].int())
        return roc_auc_score(masks.flatten().numpy(), combined.flatten().numpy()) + float(pro.compute())

    readings = {a: localisation(a) for a in choices}
    assert len(set(readings.values())) == len(choices)  # alpha changes what is read
    expected = max(choices, key=readings.get)

    run = engine(tmp_path)
    run.validate(model=module, datamodule=data)
    assert model.alpha == expected
    path = tmp_path / "ran.ckpt"
    run.trainer.save_checkpoint(path)
    assert Ran.load_from_checkpoint(path).model.alpha == expected  # the choices are saved hyper-parameters
    assert Ran.load_from_checkpoint(path, alpha_choices=None).model.alpha == 0.3  # without choices the configured alpha
    batch = images(2)
    with torch.no_grad():  # Eq. 11 as base + alpha * extra is the level-averaged weighted sum
        kl, feature = model.level_maps(batch)
        torch.testing.assert_close(
            model.predict(batch).anomaly_map, model.scorer.blur(ensemble(kl, feature, model.normaliser, model.alpha, True, "position"))
        )
    with pytest.raises(ValueError, match="alpha_choices must lie in"):
        Ran(**TINY_RAN, alpha_choices=[0.5, 2.0])


# --- arguments and configurations ---------------------------------------------------------------------------
def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 249\]"):
        Ran(**TINY_RAN, inference_timesteps=[5, 250])
    with pytest.raises(ValueError, match="feature_block must index"):
        Ran(**TINY_RAN, feature_block=4)
    with pytest.raises(ValueError, match="alpha must lie in"):
        Ran(**TINY_RAN, alpha=1.5)
    with pytest.raises(ValueError, match="positional_shrinkage must be >= 0"):
        Ran(**TINY_RAN, positional_shrinkage=-0.1)
    with pytest.raises(ValueError, match="guidance_features must lie in"):
        Ran(**{**TINY_RAN, "guidance_features": 1000})


@pytest.mark.parametrize("config", ["cpu", "paper"])
def test_configs_match_the_reference(config: str) -> None:
    init_args = config_file("ran", config)["model"]["init_args"]
    inspect.signature(Ran).bind(**init_args)  # every key is an argument
    levels = [5, 50, 100] if config == "paper" else [50]  # the CPU config reads one of the reference's levels
    assert init_args["inference_timesteps"] == levels and init_args["respacing"] == 250 and init_args["top_k"] == 64
    assert init_args["gradient_denoising"] is False and init_args["alpha"] == 0.5
    assert init_args["alpha_choices"] == ([0.25, 0.5, 0.6, 0.75, 0.9, 1.0] if config == "cpu" else None)  # 0.5 among them
    assert init_args["feature_layers"] == (["blocks.4"] if config == "paper" else ["blocks.2", "blocks.4"])  # README
    if config == "cpu":  # the paper's 554M-parameter UNet is not built here
        module = Ran(**{**init_args, "pre_trained": False})
        assert module.model.denoiser.config.out_channels == 6 and module.model.size_multiple == 16
