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


def test_train_and_eval_outputs() -> None:
    model = DiffusionADModel(**TORCH_KWARGS)
    images = _images()
    out = model.train()(images)
    assert isinstance(out, DiffusionADOutput)
    assert out.noise.shape == out.predicted_noise.shape == out.reconstruction.shape == images.shape
    assert out.mask_logits.shape == (2, 1, 64, 64)
    with torch.no_grad():
        pred = model.eval()(images)
    assert isinstance(pred, InferenceBatch)
    assert pred.pred_score.shape == (2,)
    assert pred.anomaly_map.shape == (2, 1, 64, 64)
    assert pred.anomaly_map.min() >= 0 and pred.anomaly_map.max() <= 1


def test_inference_is_deterministic_and_independent_of_the_batch() -> None:
    model = DiffusionADModel(**TORCH_KWARGS).eval()
    images = _images(3)
    with torch.no_grad():
        full = model(images)
        again = model(images)
        single = model(images[1:2])
    assert torch.equal(full.pred_score, again.pred_score)
    torch.testing.assert_close(single.anomaly_map[0], full.anomaly_map[1], atol=1e-5, rtol=0)


def test_inference_averages_every_noise_level() -> None:
    images = _images(1)
    torch.manual_seed(1)
    model = DiffusionADModel(**TORCH_KWARGS, inference_timesteps=(100, 200), smoothing_sigma=0).eval()
    with torch.no_grad():
        both = model(images).anomaly_map
        model.inference_timesteps = (100,)
        first = model(images).anomaly_map
        model.inference_timesteps = (200,)
        model.inference_seed = 1  # the second level uses seed + 1
        second = model(images).anomaly_map
    torch.testing.assert_close(both, (first + second) / 2, atol=1e-6, rtol=0)


def test_loss_matches_hand_computation() -> None:
    noise = torch.tensor([[[[1.0, -1.0]]]])
    predicted = torch.tensor([[[[0.0, -1.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.tensor([[[[0.0, 0.0]]]])
    losses = DiffusionADLoss(focal_weight=5.0, focal_gamma=2.0)(noise, predicted, mask, logits)
    assert losses["noise"].item() == pytest.approx(0.5)  # ((1-0)^2 + 0) / 2
    assert losses["smooth_l1"].item() == pytest.approx(0.125)  # 0.5 * 0.5^2 for both pixels
    focal = -(0.5**2) * torch.log(torch.tensor(0.5)).item()  # p_t = 0.5 on both pixels
    assert losses["focal"].item() == pytest.approx(focal)
    assert losses["loss"].item() == pytest.approx(0.5 + 0.125 + 5 * focal)


def test_loss_decreases_when_overfitting_a_few_images() -> None:
    torch.manual_seed(0)
    module = DiffusionAD(**TINY_DIFFUSION_AD, anomaly_probability=1.0)
    optimizer = torch.optim.Adam(module.model.parameters(), lr=2e-3)
    images = _images(4)
    masks = torch.zeros(4, 1, 64, 64)
    masks[..., 16:40, 20:44] = 1
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
