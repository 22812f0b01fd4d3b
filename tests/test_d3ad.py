"""D3AD (issue 15): dynamic step, conditioned scaled DDIM, domain adaptation, fitted state, DDAD configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from conftest import TINY_D3AD, TINY_DIAD, config_file
from diffusers import DDIMScheduler
from lightning.pytorch import Callback, LightningModule, Trainer
from test_reliability import datamodule, engine, sample_images

from anomalib_dpnr import D3AD
from anomalib_dpnr.models.d3ad.dynamic_step import DynamicStep
from anomalib_dpnr.models.d3ad.torch_model import D3ADModel

MODEL_ARGS = {k: v for k, v in TINY_D3AD.items() if k != "statistics_images"}


def tiny_model(**overrides: object) -> D3ADModel:
    torch.manual_seed(0)
    return D3ADModel(**{**MODEL_ARGS, **overrides}).eval()


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- dynamic step --------------------------------------------------------------------------------------------
def test_training_distances_leave_each_image_out() -> None:
    features = torch.rand(5, 4, 3, generator=torch.Generator().manual_seed(0))
    features[1] = features[0]  # a duplicate: its own copy is its nearest neighbour, itself is not
    step = DynamicStep(k=2, num_bins=4)
    step.fit(features)
    pairwise = (features.unsqueeze(1) - features.unsqueeze(0)).abs().sum(dim=(-1, -2))
    pairwise.fill_diagonal_(float("inf"))
    expected = pairwise.topk(2, dim=1, largest=False).values.mean(dim=1)
    torch.testing.assert_close(step.train_distances, expected)
    assert step.train_distances.min() > 0  # with self counted, k=2 would average a 0 in for every image
    distances = step.train_distances
    assert step.edges[0] == distances.min() and step.edges[-1] == distances.max() and len(step.edges) == 5


def test_step_grows_with_the_knn_estimate() -> None:
    step = DynamicStep(k=3, num_bins=10, min_bin=2, max_step=80, step_rounding=10)
    step.fit(torch.rand(12, 16, 8, generator=torch.Generator().manual_seed(0)))
    low, high = float(step.edges[0]), float(step.edges[-1])
    distances = torch.linspace(low - 1, high + 1, 50)
    steps = step.steps(distances)
    assert (steps[1:] >= steps[:-1]).all() and steps[0] == 20 and steps[-1] == 80
    assert set(steps.tolist()) == set(step.levels) == {20, 30, 40, 50, 60, 70, 80}
    # end to end: images further from the bank get larger distances and never a smaller step
    bank = step.bank.mean(dim=0, keepdim=True)
    noise = torch.rand(1, 16, 8, generator=torch.Generator().manual_seed(1))
    queries = torch.cat([bank + scale * noise for scale in (0.0, 0.5, 1.0, 2.0, 4.0)])
    distances = step.distances(queries)
    assert (distances[1:] > distances[:-1]).all()
    chosen = step.steps(distances)
    assert (chosen[1:] >= chosen[:-1]).all() and chosen[-1] == 80


def test_model_steps_come_from_the_bank_and_regions_have_their_own() -> None:
    model = tiny_model()
    bank = images(6, seed=2)
    model.dynamic.fit(model.bank_features(bank))
    knn_map = model.backbone.layer_maps(torch.cat([bank[:1], images(1, seed=3) * 0 + 1]))[0]
    steps = model.start_steps(knn_map)
    assert steps.shape == (2,) and steps[1] > steps[0]  # a constant white image is far from the bank
    regional = tiny_model(step_mode="region")
    regional.dynamic.fit(regional.bank_features(bank))
    region_steps = regional.start_steps(knn_map)
    assert region_steps.shape == (2, 1, 4, 4) and set(region_steps.unique().tolist()) <= set(regional.dynamic.levels)


def test_region_mode_with_one_step_everywhere_is_image_mode() -> None:
    model = tiny_model(condition_weight=2.0)
    latents = images()
    steps = torch.full((2, 1, 4, 4), 40)
    torch.testing.assert_close(model.reconstruct_regions(latents, steps), model.reconstruct(latents, steps[:, 0, 0, 0]))
    mixed = steps.clone()
    mixed[:, :, :2] = 80  # top half from step 80, bottom half from step 40
    composed = model.reconstruct_regions(latents, mixed)
    top = model.reconstruct(latents, torch.full((2,), 80))
    torch.testing.assert_close(composed[..., :32, :], top[..., :32, :])
    torch.testing.assert_close(composed[..., 32:, :], model.reconstruct(latents, torch.full((2,), 40))[..., 32:, :])


@pytest.mark.parametrize("mode", ["image", "region", "fixed"])
def test_every_step_mode_predicts_and_the_mode_matters(mode: str) -> None:
    model = tiny_model(step_mode=mode, fixed_step=80)
    if model.needs_bank:
        model.dynamic.fit(model.bank_features(images(6, seed=2)))
    batch = torch.cat([images(1, seed=2), images(1, seed=5)])
    out = model.predict(batch)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(out.anomaly_map).all()
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(dim=1))  # image score = the map's max
    other = tiny_model(step_mode=mode, fixed_step=300)
    other.load_state_dict(model.state_dict())
    other.dynamic.max_step = 300  # the same bank and bins, larger steps
    assert not torch.allclose(other.predict(batch).anomaly_map, out.anomaly_map)


def test_unweighted_feature_term_is_not_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(step_mode="fixed", fixed_step=50, feature_weight=0.0)
    batch = images(2)
    expected = model.score_maps(*model.term_maps(batch)[:2])  # both terms computed, the feature one weighted 0
    calls = []
    layer_maps = model.backbone.layer_maps
    monkeypatch.setattr(model.backbone, "layer_maps", lambda x: calls.append(x) or layer_maps(x))
    out = model.predict(batch)
    assert len(calls) == 1  # the input only (start step), no reconstruction features
    torch.testing.assert_close(out.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(out.pred_score, expected.pred_score)


@torch.no_grad()
def test_positional_statistics_switch_the_reading_of_one_fitted_model() -> None:
    from anomalib_dpnr.components.statistics import MapAccumulator

    model = tiny_model(step_mode="fixed", fixed_step=50)
    accumulator = MapAccumulator()
    accumulator.add(torch.stack(model.term_maps(images(4, seed=5))[:2]))
    model.normaliser.fit(accumulator.result())
    batch = images(2)
    latent, feature, _ = model.term_maps(batch)
    minmax = model.predict(batch).anomaly_map
    model.positional_statistics = True
    positional = model.predict(batch).anomaly_map
    assert not torch.allclose(positional, minmax)
    statistics = model.normaliser
    expected = model.pixel_weight * statistics(latent, 0, "position") + model.feature_weight * statistics(feature, 1, "position")
    torch.testing.assert_close(positional, model.scorer(expected)[0])
    module = D3AD(**TINY_D3AD, positional_statistics=True)
    assert module.model.positional_statistics and "model.normaliser.position_std" in module.state_dict()
    with pytest.raises(ValueError, match="positional_statistics reads the map-normalisation statistics"):
        D3AD(**TINY_D3AD, positional_statistics=True, normalise_maps=False)
    with pytest.raises(ValueError, match="positional_shrinkage must be >= 0"):
        D3AD(**TINY_D3AD, positional_shrinkage=-0.5)


# --- reconstruction -------------------------------------------------------------------------------------------
@torch.no_grad()
def test_fixed_step_unconditioned_scaled_start_is_plain_ddim() -> None:
    model = tiny_model(step_mode="fixed", fixed_step=80, ddim_steps=8, condition_weight=0.0)
    latents = images()
    ours = model.reconstruct(latents, torch.full((2,), 80))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0195,
        clip_sample=False, set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading",
    )  # fmt: skip
    scheduler.set_timesteps(100)  # step size 10: 80, 70, ..., 10 -> 0
    x = scheduler.alphas_cumprod[80].sqrt() * latents
    for t in scheduler.timesteps:
        if 0 < t <= 80:
            x = scheduler.step(model.denoiser(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    noised = tiny_model(step_mode="fixed", fixed_step=80, ddim_steps=8, condition_weight=0.0, add_noise=True)
    assert not torch.allclose(noised.reconstruct(latents, torch.full((2,), 80), noised.generator(latents.device)), ours)


@torch.no_grad()
def test_conditioning_pulls_the_reconstruction_towards_the_input() -> None:
    latents = images()
    distances = []
    for weight in (0.0, 1.0, 2.0, 4.0):
        model = tiny_model(condition_weight=weight, ddim_steps=4)
        distances.append(float((model.reconstruct(latents, torch.full((2,), 80)) - latents).abs().mean()))
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False)), distances


# --- components receive gradient and change the output ----------------------------------------------------------
def test_each_component_trains_in_its_phase_and_changes_the_output() -> None:
    module = D3AD(**{**TINY_D3AD, "domain_adaptation": True}, seed=0)
    model = module.model
    model.dynamic.fit(model.bank_features(images(6, seed=2)))
    batch = images(2)
    model.train()
    output = model(batch)
    module.loss(output.noise, output.predicted)["loss"].backward()
    assert all(p.grad is not None for p in model.denoiser.parameters())
    assert all(p.grad is None for p in model.adapted.parameters())
    module.zero_grad(set_to_none=True)
    module.adaptation_loss(*model.adaptation_features(batch))["loss"].backward()
    assert all(p.grad is None for p in model.denoiser.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.adapted.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.backbone.parameters())  # the frozen backbone stays frozen
    model.eval()
    with torch.no_grad():
        before = model.predict(batch).anomaly_map
        next(model.adapted.parameters()).mul_(1.5)
        after_adapted = model.predict(batch).anomaly_map
        next(model.denoiser.parameters()).mul_(1.5)
        after_denoiser = model.predict(batch).anomaly_map
    assert not torch.allclose(before, after_adapted) and not torch.allclose(after_adapted, after_denoiser)


def test_frozen_copy_term_pulls_the_copy_back_when_weighted() -> None:
    module = D3AD(**{**TINY_D3AD, "domain_adaptation": True, "frozen_weight": 0.1}, seed=0)
    model = module.model.train()
    with torch.no_grad():
        for p in model.adapted.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the copy has drifted from the frozen backbone
    features = model.adaptation_features(images(2))
    losses = module.adaptation_loss(*features)
    assert losses["frozen"] > 0 and torch.isclose(losses["loss"], losses["consistency"] + 0.1 * losses["frozen"])
    grads = torch.autograd.grad(losses["loss"], list(model.adapted.parameters()), retain_graph=True, allow_unused=True)
    plain = torch.autograd.grad(losses["consistency"], list(model.adapted.parameters()), allow_unused=True)
    assert any(g is not None and p is not None and not torch.allclose(g, p) for g, p in zip(grads, plain, strict=True))


# --- one anomalib fit: phases, fitted state, checkpoint ---------------------------------------------------------
class Phases(Callback):
    def __init__(self) -> None:
        self.adapting: dict[int, set[bool]] = {}

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, *args: object) -> None:
        self.adapting.setdefault(trainer.current_epoch, set()).add(module.adapting)


def fit_with(callback: Callback, module: LightningModule, root: Path, max_epochs: int, dataset: Path) -> None:
    """One quiet CPU ``Engine.fit`` of ``module`` on ``dataset`` with ``callback``."""
    Engine(
        default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    ).fit(module, datamodule=datamodule(dataset))  # fmt: skip


@pytest.fixture(scope="module")
def adapted_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[D3AD, Path, Phases]:
    root = tmp_path_factory.mktemp("d3ad_da")
    module = D3AD(**{**TINY_D3AD, "domain_adaptation": True}, seed=0)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    phases = Phases()
    fit_with(phases, module, root, 2, tiny_dataset)
    module.initial = initial  # type: ignore[attr-defined]
    (checkpoint,) = root.glob("**/weights/lightning/model.ckpt")
    return module.eval(), checkpoint, phases


def test_fit_runs_denoiser_then_adaptation(adapted_run: tuple[D3AD, Path, Phases]) -> None:
    module, _, phases = adapted_run
    assert phases.adapting == {0: {False}, 1: {True}}
    state = module.model.state_dict()
    changed = lambda prefix: any(not torch.equal(v, module.initial[k]) for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    assert changed("denoiser.") and changed("adapted.") and not changed("backbone.")


def test_statistics_and_bins_come_from_training_images(adapted_run: tuple[D3AD, Path, Phases], tiny_dataset: Path) -> None:
    module, _, _ = adapted_run
    data = datamodule(tiny_dataset)
    data.setup()
    normaliser = module.model.normaliser
    assert bool(normaliser.fitted)
    fitted = {name: buffer.clone() for name, buffer in normaliser.named_buffers()}
    module.fit_statistics(data.train_data)
    for name, buffer in normaliser.named_buffers():
        torch.testing.assert_close(buffer, fitted[name])
    assert normaliser.position_mean.shape == (2, 64, 64) and (normaliser.high > normaliser.low).all()
    bank = module.model.dynamic.bank.clone()
    module.build_bank(data.train_data)
    assert torch.equal(module.model.dynamic.bank, bank) and bank.shape[0] == len(data.train_data)


def test_bank_and_adapted_backbone_survive_the_checkpoint(adapted_run: tuple[D3AD, Path, Phases], tiny_dataset: Path) -> None:
    module, checkpoint, _ = adapted_run
    reloaded = D3AD.load_from_checkpoint(checkpoint).eval()
    expected, got = module.state_dict(), reloaded.state_dict()
    for prefix in ("model.dynamic.", "model.adapted.", "model.normaliser.", "model.denoiser."):
        keys = [k for k in expected if k.startswith(prefix)]
        assert keys and all(torch.equal(got[k], expected[k]) for k in keys), prefix
    assert reloaded.model.dynamic.bank.numel() > 0
    batch = sample_images(tiny_dataset)
    with torch.no_grad():
        a, b = module(batch), reloaded(batch)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)


def test_feature_weight_is_chosen_on_the_validation_split_after_the_statistics(
    adapted_run: tuple[D3AD, Path, Phases], tiny_dataset: Path, tmp_path: Path
) -> None:
    from anomalib_dpnr.components.term_weights import best_weight, weight_scores

    _, checkpoint, _ = adapted_run
    choices = (0.0, 0.15, 5.0)
    module = D3AD.load_from_checkpoint(checkpoint, feature_weight_choices=choices).eval()
    data = datamodule(tiny_dataset)
    data.setup()
    model, bases, extras, masks = module.model, [], [], []
    with torch.no_grad():  # the choice, from the normalised terms of the validation images
        for batch in data.val_dataloader():
            images, gt_mask = module.pre_processor.transform(batch.image, batch.gt_mask)
            latent, feature, _ = model.term_maps(images)
            bases.append(model.scorer.blur(model.pixel_weight * model.normaliser(latent, 0, "minmax")))
            extras.append(model.scorer.blur(model.normaliser(feature, 1, "minmax")))
            masks.append(gt_mask.view(-1, 1, *gt_mask.shape[-2:]).bool())
    expected = best_weight(weight_scores(torch.cat(bases), torch.cat(extras), torch.cat(masks), choices))
    run = engine(tmp_path)
    run.validate(model=module, datamodule=data)
    assert module.model.feature_weight == expected
    path = tmp_path / "d3ad.ckpt"
    run.trainer.save_checkpoint(path)
    assert D3AD.load_from_checkpoint(path, feature_weight=0.5, feature_weight_choices=choices).model.feature_weight == expected
    fixed = D3AD.load_from_checkpoint(path, feature_weight=0.5, feature_weight_choices=None)
    assert fixed.model.feature_weight == 0.5  # without choices the configured weight stands

    order: list[str] = []  # during fit the weight is chosen on maps normalised with this fit's statistics
    fitted = D3AD(**TINY_D3AD, feature_weight_choices=choices)
    for name in ("fit_statistics", "fit_weight"):
        method = getattr(fitted, name)
        setattr(fitted, name, lambda *a, _m=method, _n=name: order.append(_n) or _m(*a))
    engine(tmp_path / "fit").fit(fitted, datamodule=datamodule(tiny_dataset))
    assert order == ["fit_statistics", "fit_weight"]


def test_adaptation_needs_a_denoiser_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_epochs=1 leaves no epoch for the denoiser"):
        engine(tmp_path).fit(D3AD(**{**TINY_D3AD, "domain_adaptation": True}), datamodule=datamodule(tiny_dataset))
    with pytest.raises(ValueError, match="step_mode must be one of"):
        D3AD(**TINY_D3AD, step_mode="dynamic")
    with pytest.raises(ValueError, match="domain_adaptation_epochs >= 1"):
        D3AD(**{**TINY_D3AD, "domain_adaptation": True}, domain_adaptation_epochs=0)


# --- trained latent autoencoder ------------------------------------------------------------------------------
AUTOENCODER = {"autoencoder_channels": [8, 8], "latent_channels": 4, "autoencoder_epochs": 1}


def test_trained_autoencoder_codec() -> None:
    from anomalib_dpnr.components.latent import LatentCodec

    torch.manual_seed(0)
    codec = LatentCodec(autoencoder_channels=[8, 8, 8], latent_channels=4, norm_num_groups=8)
    assert codec.trainable and codec.factor == 4 and codec.channels == 4 and float(codec.scale) == 1.0
    batch = images(3)
    assert codec.encode(batch).shape == (3, 4, 16, 16) and codec.decode(codec.encode(batch)).shape == batch.shape
    losses = codec.reconstruction_loss(batch, kl_weight=0.1)
    torch.testing.assert_close(losses["loss"], losses["l1"] + 0.1 * losses["kl"])
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in codec.vae.parameters())
    raw = codec.encode(batch)  # scale 1: the unscaled posterior mean
    scale = codec.fit_scale([batch[:2], batch[2:]])
    assert scale == pytest.approx(1 / float(raw.std()), rel=1e-4) and "scale" in codec.state_dict()
    torch.testing.assert_close(codec.encode(batch), raw * scale)
    torch.testing.assert_close(codec.decode(codec.encode(batch)), codec.vae.decode(raw).sample)  # decode undoes the scale
    fixed = LatentCodec(scale=0.5, autoencoder_channels=[8, 8], norm_num_groups=8)
    assert fixed.fit_scale([batch]) == 0.5  # a given scale is kept
    with pytest.raises(ValueError, match="not both"):
        LatentCodec("some/vae", autoencoder_channels=[8, 8], norm_num_groups=8)
    with pytest.raises(ValueError, match="autoencoder_channels .* positive multiple of norm_num_groups=8"):
        LatentCodec(autoencoder_channels=[8, 12], norm_num_groups=8)
    with pytest.raises(ValueError, match="cannot fit the latent scale"):
        codec.fit_scale([])
    with pytest.raises(RuntimeError, match="has none"):
        LatentCodec().reconstruction_loss(batch)


class AutoencoderPhases(Callback):
    """Each epoch's phase, and the autoencoder's weights after its own epoch."""

    def __init__(self) -> None:
        self.phase: dict[int, set[str]] = {}
        self.after_autoencoder: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Trainer, module: LightningModule, *args: object) -> None:
        adapting = getattr(module, "adapting", False)  # D3AD's last phase
        phase = "autoencoder" if module.training_autoencoder else "adaptation" if adapting else "denoiser"
        self.phase.setdefault(trainer.current_epoch, set()).add(phase)

    def on_train_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.after_autoencoder = {k: v.clone() for k, v in module.model.codec.vae.state_dict().items()}


def test_fit_trains_the_autoencoder_first_then_diffuses_in_its_latent(tiny_dataset: Path, tmp_path: Path) -> None:
    module = D3AD(**{**TINY_D3AD, **AUTOENCODER, "domain_adaptation": True}, seed=0)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    phases = AutoencoderPhases()
    fit_with(phases, module, tmp_path, 3, tiny_dataset)
    assert phases.phase == {0: {"autoencoder"}, 1: {"denoiser"}, 2: {"adaptation"}}
    logged = {name.removesuffix("_epoch").removesuffix("_step") for name in module.trainer.callback_metrics}
    assert {"train_loss", "train_autoencoder_l1", "train_autoencoder_kl", "train_adaptation_consistency", "latent_scale"} <= logged
    state = module.model.state_dict()
    changed = lambda prefix: any(not torch.equal(v, initial[k]) for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    assert changed("codec.vae.") and changed("denoiser.") and changed("adapted.")
    codec = module.model.codec  # trained in epoch 0 only, then frozen; its scale fitted at epoch 1
    assert all(torch.equal(v, phases.after_autoencoder[k]) for k, v in codec.vae.state_dict().items())
    assert float(codec.scale) != 1.0 and module.model.denoiser.config.in_channels == 4
    module.eval()
    batch = sample_images(tiny_dataset)
    assert module.model.codec.encode(batch).shape[-2:] == (32, 32)
    (checkpoint,) = tmp_path.glob("**/weights/lightning/model.ckpt")
    reloaded = D3AD.load_from_checkpoint(checkpoint).eval()
    assert torch.equal(reloaded.model.codec.scale, codec.scale)
    with torch.no_grad():
        before, again = module(batch), reloaded(batch)
        assert torch.equal(before.anomaly_map, again.anomaly_map)
        next(iter(codec.vae.decoder.parameters())).mul_(1.5)  # the decoder shapes the feature term
        after_decoder = module(batch).anomaly_map
        next(iter(codec.vae.encoder.parameters())).mul_(1.5)  # the encoder shapes the latent
        after_encoder = module(batch).anomaly_map
    assert not torch.allclose(before.anomaly_map, after_decoder) and not torch.allclose(after_decoder, after_encoder)
    fast = D3AD.load_from_checkpoint(checkpoint, inference_dtype="bfloat16").eval()  # encoder and decoder in bfloat16
    dtypes: list[torch.dtype] = []
    for conv in (fast.model.codec.vae.encoder.conv_in, fast.model.codec.vae.decoder.conv_out):
        conv.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    with torch.no_grad():
        got = fast(batch).anomaly_map
    assert dtypes == [torch.bfloat16] * 2 and got.dtype == torch.float32
    assert (got - again.anomaly_map).abs().max() <= 0.1 * again.anomaly_map.abs().max()
    dtypes.clear()
    fast.model.codec.train()
    fast.model.codec.encode(batch)
    assert dtypes == [torch.float32]  # training is unaffected


def test_trained_autoencoder_arguments_are_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs both autoencoder_channels and autoencoder_epochs"):
        D3AD(**TINY_D3AD, autoencoder_channels=[8, 8])
    with pytest.raises(ValueError, match="needs both autoencoder_channels and autoencoder_epochs"):
        D3AD(**TINY_D3AD, autoencoder_epochs=2)
    with pytest.raises(ValueError, match="max_epochs=1 leaves no epoch for the denoiser besides autoencoder_epochs=1"):
        engine(tmp_path).fit(D3AD(**TINY_D3AD, **AUTOENCODER), datamodule=datamodule(tiny_dataset))


@pytest.mark.parametrize("name", ["D3AD", "DiAD"])
def test_autoencoder_norm_groups(name: str) -> None:
    """The trained autoencoder's GroupNorm groups are its own argument (default: the denoiser's)."""
    from anomalib_dpnr import DiAD

    model_class, tiny = (D3AD, TINY_D3AD) if name == "D3AD" else (DiAD, {**TINY_DIAD, "hint_channels": [8, 8]})
    narrow = {"autoencoder_channels": [4, 8], "autoencoder_epochs": 1}
    with pytest.raises(ValueError, match=r"autoencoder_channels \(4, 8\) .* multiple of norm_num_groups=8"):
        model_class(**tiny, **narrow)

    def groups(module: D3AD) -> set[int]:
        return {m.num_groups for m in module.model.codec.vae.modules() if isinstance(m, torch.nn.GroupNorm)}

    assert groups(model_class(**tiny, **narrow, autoencoder_norm_groups=4)) == {4}
    assert groups(model_class(**tiny, autoencoder_channels=[8, 8], autoencoder_epochs=1)) == {tiny["norm_num_groups"]}


# --- configurations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["cpu", "pixel_cpu", "paper", "ddad", "ddad_cpu"])
def test_configs_build(config: str) -> None:
    init_args = config_file("d3ad", config)["model"]["init_args"]
    init_args.update(pre_trained=False, vae_path=None)  # no weights needed to check the arguments
    module = D3AD(**init_args)
    if config.startswith("ddad"):
        model = module.model
        assert model.step_mode == "fixed" and model.fixed_step == 250 and model.add_noise and model.condition_weight == 3
        assert module.adaptation_loss.frozen_weight == 0.1 and model.codec.vae is None
    else:
        assert module.model.step_mode == "image" and not module.model.add_noise
    if config == "cpu":  # the shipped CPU config diffuses in a trained autoencoder's latent space
        assert module.autoencoder_epochs == 10 and module.model.codec.vae is not None


DDAD_METHOD = (
    "beta_start", "beta_end", "step_mode", "fixed_step", "ddim_steps", "add_noise", "condition_weight", "frozen_weight",
    "pixel_weight", "feature_weight", "feature_weight_choices", "feature_pooling",
)


def test_ddad_cpu_config_is_ddads_method_on_the_pixel_cpu_configs_networks() -> None:
    cpu, ddad, ddad_cpu = config_file("d3ad", "pixel_cpu"), config_file("d3ad", "ddad"), config_file("d3ad", "ddad_cpu")
    args = ddad_cpu["model"]["init_args"]
    assert {key: args[key] for key in DDAD_METHOD} == {key: ddad["model"]["init_args"][key] for key in DDAD_METHOD}
    rest = {key: value for key, value in args.items() if key not in DDAD_METHOD}
    assert rest == {key: value for key, value in cpu["model"]["init_args"].items() if key not in DDAD_METHOD}
    assert {key: ddad_cpu[key] for key in ("trainer", "data")} == {key: cpu[key] for key in ("trainer", "data")}


def test_cpu_config_is_pixel_cpu_with_a_trained_autoencoder() -> None:
    latent, pixel = config_file("d3ad"), config_file("d3ad", "pixel_cpu")
    added = {key: value for key, value in latent["model"]["init_args"].items() if key not in pixel["model"]["init_args"]}
    assert added.pop("autoencoder_channels") and added.pop("autoencoder_epochs") == 10
    assert {key: pixel["model"]["init_args"][key] for key in pixel["model"]["init_args"]} == {
        key: latent["model"]["init_args"][key] for key in pixel["model"]["init_args"]
    }
    epochs = latent["trainer"]["max_epochs"] - pixel["trainer"]["max_epochs"]
    assert epochs == 10 == latent["trainer"]["check_val_every_n_epoch"] - pixel["trainer"]["check_val_every_n_epoch"]
