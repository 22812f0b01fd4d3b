"""DiffusionAD: torch model, loss, lightning wiring and checkpoints."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch
from conftest import TINY_DIFFUSION_AD

from anomalib_dpnr import DiffusionAD
from anomalib_dpnr.models.diffusion_ad.loss import DiffusionADLoss
from anomalib_dpnr.models.diffusion_ad.torch_model import DiffusionADModel, DiffusionADOutput

TORCH_KWARGS = {k: v for k, v in TINY_DIFFUSION_AD.items() if k != "image_size"}


def _images(batch: int = 2, size: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(batch, 3, size, size) * 2 - 1


def _model(**overrides: object) -> DiffusionADModel:
    """Tiny model whose networks give non-trivial outputs: noise predictions and maps vary with the input."""
    torch.manual_seed(1)
    model = DiffusionADModel(**{**TORCH_KWARGS, "smoothing_sigma": 0, **overrides})
    torch.nn.init.normal_(model.denoiser.conv_out.weight, std=0.3)
    final = model.segmenter.decoder_segment.fin_out[0]
    torch.nn.init.normal_(final.weight, std=0.5)
    return model.eval()


def test_train_and_eval_outputs() -> None:
    model = DiffusionADModel(**TORCH_KWARGS)
    images = _images()
    out = model.train()(images)
    assert isinstance(out, DiffusionADOutput)
    assert out.noise.shape == out.predicted_noise.shape == (2, 2, *images.shape[1:])  # [B, levels, C, H, W]
    assert out.reconstruction.shape == images.shape
    assert out.mask_logits.shape == (2, 1, 64, 64)
    with torch.no_grad():
        pred = model.eval()(images)
    assert isinstance(pred, InferenceBatch)
    assert pred.pred_score.shape == (2,)
    assert pred.anomaly_map.shape == (2, 1, 64, 64)
    assert pred.anomaly_map.min() >= 0 and pred.anomaly_map.max() <= 1


@pytest.mark.parametrize("mode", ["norm_guided", "average"])
def test_inference_is_deterministic_and_independent_of_the_batch(mode: str) -> None:
    model = _model(inference_mode=mode)
    images = _images(3)
    with torch.no_grad():
        full = model(images)
        again = model(images)
        single = model(images[1:2])
    assert torch.equal(full.pred_score, again.pred_score)
    torch.testing.assert_close(single.anomaly_map[0], full.anomaly_map[1], atol=1e-5, rtol=0)


def _noise(model: DiffusionADModel, index: int, like: torch.Tensor) -> torch.Tensor:
    """The fixed inference noise of level ``index``, drawn here independently of the model's code."""
    generator = torch.Generator().manual_seed(model.inference_seed + index)
    return torch.randn((1, *like.shape[1:]), generator=generator).expand_as(like)


def _one_step(model: DiffusionADModel, images: torch.Tensor, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbatched hand version: ``(x_t, eps(x_t))`` of one level, one denoiser call."""
    abar = model.schedule.alphas_cumprod[step]
    noisy = abar.sqrt() * images + (1 - abar).sqrt() * _noise(model, index, images)
    return noisy, model.denoiser(noisy, torch.full((images.shape[0],), step)).sample


def _x0(model: DiffusionADModel, noisy: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
    abar = model.schedule.alphas_cumprod[step]
    return ((noisy - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)


def _hand_norm_guided(model: DiffusionADModel, images: torch.Tensor, guided: int = 200, guiding: int = 400, w: float = 1.0) -> torch.Tensor:
    """The reference formula, written out level by level: x0 from ``guiding`` guides the step at ``guided``."""
    x_t, eps_t = _one_step(model, images, guided, 0)
    x_s, eps_s = _one_step(model, images, guiding, 1)
    x0_s = _x0(model, x_s, eps_s, guiding)
    abar = model.schedule.alphas_cumprod[guided]
    x_t_s = abar.sqrt() * x0_s + (1 - abar).sqrt() * eps_t
    eps_tilde = eps_t - w * (1 - abar).sqrt() * (x_t_s - x_t)
    return _x0(model, x_t, eps_tilde, guided)


def test_norm_guided_equals_the_hand_formula_and_differs_from_averaging() -> None:
    model = _model(inference_mode="norm_guided")
    images = _images(3)
    with torch.no_grad():
        expected_x0 = _hand_norm_guided(model, images)
        expected_map = torch.sigmoid(model.segmenter(torch.cat([images, expected_x0], dim=1)))
        got = model(images)
        torch.testing.assert_close(model.guided_estimate(images), expected_x0, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.anomaly_map, expected_map, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.pred_score, expected_map.flatten(1).topk(50).values.mean(1), atol=1e-5, rtol=0)
        model.inference_mode = "average"
        averaged = model(images)
        # the guidance itself changes the estimate: w = 0 is plain one-step denoising at the guided level
        model.guidance_weight = 0.0
        unguided = model.guided_estimate(images)
        x_t, eps_t = _one_step(model, images, 200, 0)
    assert (got.anomaly_map - averaged.anomaly_map).abs().max() > 1e-2
    torch.testing.assert_close(unguided, _x0(model, x_t, eps_t, 200), atol=1e-5, rtol=0)
    assert (unguided - expected_x0).abs().max() > 1e-2


def test_norm_guided_arguments_are_used() -> None:
    images = _images(2)
    with torch.no_grad():
        base = _model()(images).anomaly_map
        for change in ({"guided_timestep": 100}, {"guiding_timestep": 600}, {"guidance_weight": 0.5}):
            model = _model(**change)
            args = {"guided": model.guided_timestep, "guiding": model.guiding_timestep, "w": model.guidance_weight}
            x0 = _hand_norm_guided(model, images, **args)
            torch.testing.assert_close(model.guided_estimate(images), x0, atol=1e-4, rtol=0)
            assert (model(images).anomaly_map - base).abs().max() > 1e-3, change
    with pytest.raises(ValueError, match="noisier"):
        DiffusionADModel(**TORCH_KWARGS, guided_timestep=400, guiding_timestep=200)
    with pytest.raises(ValueError, match="inference_mode"):
        DiffusionADModel(**TORCH_KWARGS, inference_mode="multi_step")


def test_batched_averaging_equals_one_level_at_a_time() -> None:
    model = _model(inference_mode="average", inference_timesteps=(50, 100, 200))
    images = _images(2)
    with torch.no_grad():
        got = model(images).anomaly_map
        maps = []
        for index, step in enumerate(model.inference_timesteps):
            x_t, eps = _one_step(model, images, step, index)
            maps.append(torch.sigmoid(model.segmenter(torch.cat([images, _x0(model, x_t, eps, step)], dim=1))))
    torch.testing.assert_close(got, sum(maps) / 3, atol=1e-5, rtol=0)
    assert (maps[0] - maps[2]).abs().max() > 1e-3  # every level contributes something different


@pytest.mark.parametrize("mode", ["norm_guided", "average"])
def test_one_denoiser_and_one_segmentation_pass_per_batch(mode: str) -> None:
    model = _model(inference_mode=mode)
    calls = {"denoiser": 0, "segmenter": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    draws = []
    original = model._draw
    model._draw = lambda *args: draws.append(1) or original(*args)
    images = _images(2)
    out = model(images)  # grad mode on: the model switches to inference mode itself
    model(images)
    assert calls == {"denoiser": 2, "segmenter": 2}
    assert len(draws) == 1  # the fixed noise is drawn once and reused
    assert not out.anomaly_map.requires_grad and not out.anomaly_map.is_inference()
    out.anomaly_map.add_(0)  # ordinary tensors for the caller (post-processing may write in place)
    with torch.inference_mode():
        assert torch.equal(model(images).pred_score, out.pred_score)


def test_x0_estimate_is_clamped_before_the_segmentation_network() -> None:
    seen = []
    images = _images(2)
    for clamp in (True, False):
        model = _model(clamp_estimate=clamp)
        torch.nn.init.normal_(model.denoiser.conv_out.weight, std=5.0)  # wild noise predictions: x0 far outside [-1, 1]
        model.segmenter.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 3:].detach().clone()))
        with torch.no_grad():
            model(images)  # norm-guided inference
            model.inference_mode = "average"
            model(images)
        model.train()(images)
        assert len(seen) == 3
        bound = max(x.abs().max().item() for x in seen)
        assert (bound <= 1.0) if clamp else (bound > 2.0)
        seen.clear()


def test_training_levels_follow_the_reference_split() -> None:
    model = DiffusionADModel(**TORCH_KWARGS)
    steps = model.sample_timesteps(4000, torch.device("cpu"))
    assert steps[:, 0].min() == 0 and steps[:, 0].max() == 299
    assert steps[:, 1].min() == 300 and steps[:, 1].max() == 999
    scaled = DiffusionADModel(**TORCH_KWARGS, num_timesteps=100, inference_timesteps=(10,), guided_timestep=20, guiding_timestep=40)
    steps = scaled.sample_timesteps(2000, torch.device("cpu"))
    assert steps[:, 0].max() == 29 and steps[:, 1].min() == 30 and steps[:, 1].max() == 99
    with pytest.raises(ValueError, match="timestep_split"):
        DiffusionADModel(**TORCH_KWARGS, timestep_split=1.0)
    # the training pass uses those levels: the denoiser sees t_n then t_s, with independent noises
    seen = []
    model.denoiser.register_forward_pre_hook(lambda _, args: seen.append(args[1].clone()))
    torch.manual_seed(0)
    out = model.train()(_images(4))
    assert torch.equal(seen[0], out.timesteps.T.reshape(-1))
    assert (out.timesteps[:, 0] < 300).all() and (out.timesteps[:, 1] >= 300).all()
    assert not torch.allclose(out.noise[:, 0], out.noise[:, 1])
    # and the segmentation network sees the norm-guided estimate from those levels and noises
    abar = model.schedule.alphas_cumprod
    t_n, t_s = out.timesteps[:, 0], out.timesteps[:, 1]
    a_n, a_s = (abar[t].reshape(-1, 1, 1, 1) for t in (t_n, t_s))
    images = _images(4)
    x_n = a_n.sqrt() * images + (1 - a_n).sqrt() * out.noise[:, 0]
    x_s = a_s.sqrt() * images + (1 - a_s).sqrt() * out.noise[:, 1]
    eps_n, eps_s = out.predicted_noise[:, 0], out.predicted_noise[:, 1]
    x0_s = ((x_s - (1 - a_s).sqrt() * eps_s) / a_s.sqrt()).clamp(-1, 1)
    eps_tilde = eps_n - (1 - a_n).sqrt() * (a_n.sqrt() * x0_s + (1 - a_n).sqrt() * eps_n - x_n)
    expected = ((x_n - (1 - a_n).sqrt() * eps_tilde) / a_n.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(out.reconstruction, expected, atol=1e-5, rtol=0)


def test_noise_loss_counts_only_anomaly_free_images() -> None:
    torch.manual_seed(0)
    noise = torch.randn(3, 2, 3, 8, 8)
    predicted = noise + 0.1
    masks = torch.zeros(3, 1, 8, 8)
    masks[1, :, 2:5, 2:5] = 1  # image 1 carries a synthetic anomaly
    logits = torch.zeros(3, 1, 8, 8)
    loss = DiffusionADLoss()
    base = loss(noise, predicted, masks, logits)["noise"]
    assert base.item() == pytest.approx(2 * 0.01, rel=1e-4)  # two levels of MSE 0.01, images 0 and 2
    wild = predicted.clone()
    wild[1] += 10.0  # the anomalous image's noise error does not count
    assert loss(noise, wild, masks, logits)["noise"].item() == pytest.approx(base.item(), rel=1e-6)
    wild[0] += 1.0  # a normal image's does
    assert loss(noise, wild, masks, logits)["noise"].item() == pytest.approx((2 * 1.1**2 + 2 * 0.1**2) / 2, rel=1e-4)
    # a batch without a normal image: no noise term, finite loss and gradient
    predicted.requires_grad_(True)
    out = loss(noise, predicted, torch.ones(3, 1, 8, 8), logits)
    assert out["noise"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(predicted.grad).all() and predicted.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[B, L"):
        loss(noise[:, 0, 0, 0], predicted[:, 0, 0, 0], masks, logits)


def test_training_step_masks_the_noise_loss_by_the_synthetic_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator's all-zero mask marks an anomaly-free image; only those reach the noise term."""
    module = DiffusionAD(**TINY_DIFFUSION_AD, anomaly_probability=1.0, use_foreground=False)
    images = _images(4)
    augmented, masks = module.generator(images * 0.5 + 0.5)
    assert (masks.flatten(1).amax(1) > 0).all()
    normal, normal_masks = DiffusionAD(**TINY_DIFFUSION_AD, anomaly_probability=0.0).generator(images * 0.5 + 0.5)
    assert torch.equal(normal, images * 0.5 + 0.5) and normal_masks.sum() == 0
    recorded = {}
    original = module.loss.forward
    monkeypatch.setattr(module.loss, "forward", lambda *args: recorded.setdefault("out", original(*args)))
    module.training_step(ImageBatch(image=images, gt_label=torch.zeros(4, dtype=torch.long)), 0)
    assert recorded["out"]["noise"].item() == 0.0  # every image anomalous: no noise term
    assert recorded["out"]["focal"].item() > 0


def test_loss_matches_hand_computation() -> None:
    noise = torch.tensor([[[[1.0, -1.0]]]])
    predicted = torch.tensor([[[[0.0, -1.0]]]])
    mask = torch.tensor([[[[0.0, 0.0]]]])  # anomaly-free: the noise term counts
    logits = torch.tensor([[[[0.0, 0.0]]]])
    losses = DiffusionADLoss(focal_weight=5.0, focal_gamma=2.0, focal_alpha=-1)(noise, predicted, mask, logits)
    assert losses["noise"].item() == pytest.approx(0.5)  # ((1-0)^2 + 0) / 2
    assert losses["smooth_l1"].item() == pytest.approx(0.125)  # 0.5 * 0.5^2 for both pixels
    focal = -(0.5**2) * torch.log(torch.tensor(0.5)).item()  # p_t = 0.5 on both pixels
    assert losses["focal"].item() == pytest.approx(focal)
    assert losses["loss"].item() == pytest.approx(0.5 + 0.125 + 5 * focal)
    reference = DiffusionADLoss()(noise, predicted, mask, logits)  # alpha 0.5, gamma 4 (reference code)
    assert reference["focal"].item() == pytest.approx(0.5 * 0.5**4 * -torch.log(torch.tensor(0.5)).item())


def test_loss_decreases_when_overfitting_a_few_images() -> None:
    torch.manual_seed(0)
    module = DiffusionAD(**TINY_DIFFUSION_AD, anomaly_probability=1.0)
    optimizer = torch.optim.Adam(module.model.parameters(), lr=2e-3)
    images = _images(4)
    masks = torch.zeros(4, 1, 64, 64)
    masks[:2, :, 16:40, 20:44] = 1  # two anomalous images, two normal ones (the noise term's)
    anomalous = torch.where(masks.bool(), -images, images)
    module.model.train()

    def step() -> float:
        torch.manual_seed(123)  # same noise and timesteps every step: a fixed objective
        out = module.model(anomalous)
        loss = module.loss(out.noise, out.predicted_noise, masks, out.mask_logits)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    first = step()
    for _ in range(30):
        last = step()
    assert last < 0.5 * first


def test_training_step_runs_on_an_anomalib_batch() -> None:
    module = DiffusionAD(**TINY_DIFFUSION_AD)
    batch = ImageBatch(image=_images(2), gt_label=torch.zeros(2, dtype=torch.long))
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert module.model.denoiser.conv_in.weight.grad is not None
    assert module.model.segmenter.encoder_segment.block1[0].weight.grad is not None


def test_validation_step_fills_predictions() -> None:
    module = DiffusionAD(**TINY_DIFFUSION_AD).eval()
    batch = ImageBatch(image=_images(2), gt_label=torch.zeros(2, dtype=torch.long))
    with torch.no_grad():
        out = module.validation_step(batch, 0)
    assert out.pred_score.shape == (2,)
    assert out.anomaly_map.shape[-2:] == (64, 64)


def test_pre_processor_scales_to_minus_one_one() -> None:
    module = DiffusionAD(**TINY_DIFFUSION_AD)
    out = module.pre_processor.transform(torch.ones(1, 3, 100, 100))
    assert out.shape == (1, 3, 64, 64)
    assert torch.allclose(out, torch.ones_like(out))


def test_bad_input_is_named() -> None:
    model = DiffusionADModel(**TORCH_KWARGS).eval()
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match="inference_timesteps"):
        DiffusionADModel(**TORCH_KWARGS, inference_timesteps=())
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        DiffusionADModel(**TORCH_KWARGS, inference_timesteps=(100, 1000))


def test_checkpoint_reload_gives_identical_predictions(tmp_path) -> None:
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    module = DiffusionAD(**TINY_DIFFUSION_AD)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(module)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    reloaded = DiffusionAD.load_from_checkpoint(path)
    images = _images(2)
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = module.model(images), reloaded.model(images)
    assert torch.equal(a.pred_score, b.pred_score)
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    assert reloaded.model.denoiser.config.block_out_channels == (16, 32, 32, 32)


def test_grayscale_files_reach_the_model_as_three_channels(tmp_path, tiny_dataset) -> None:
    """Grayscale images on disk are handled explicitly: anomalib's MVTecAD reads every image as RGB."""
    import shutil

    import cv2
    from anomalib.data import MVTecAD

    root = tmp_path / "gray"
    shutil.copytree(tiny_dataset / "woven", root / "woven")
    for image in (root / "woven").glob("t*/*/*.png"):
        cv2.imwrite(str(image), cv2.imread(str(image), cv2.IMREAD_GRAYSCALE))
    assert cv2.imread(str(next((root / "woven" / "train" / "good").iterdir())), cv2.IMREAD_UNCHANGED).ndim == 2
    datamodule = MVTecAD(root=root, category="woven", train_batch_size=4, num_workers=0)
    datamodule.setup()
    batch = next(iter(datamodule.train_dataloader()))
    assert batch.image.shape[1] == 3
    module = DiffusionAD(**TINY_DIFFUSION_AD).eval()
    with torch.no_grad():
        out = module(batch.image)
    assert out.pred_score.shape == (4,)
