"""DiAD (issue 16): SG network, SFF block, what trains, the map, weight loading, the multi-class datamodule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import Padim
from conftest import TINY_DIAD, TINY_RAN, config_file
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from test_d3ad import AutoencoderPhases, fit_with
from test_reliability import sample_images

from anomalib_dpnr import DiAD, Ran
from anomalib_dpnr.components.weights import MissingWeightsError
from anomalib_dpnr.data import MVTecMultiClass, make_synthetic_dataset
from anomalib_dpnr.models.diad.feature_fusion import SpatialFeatureFusion
from anomalib_dpnr.models.diad.semantic_guided import skip_levels
from anomalib_dpnr.models.diad.torch_model import DiADModel, build_denoiser

MODEL_ARGS = {k: v for k, v in TINY_DIAD.items() if k != "image_size"}
# Two ResNets per level as Stable Diffusion: 12 skip outputs, SFF fuses outputs 6-8 into 9-11 (9 blocks).
SD_LAYOUT = {**MODEL_ARGS, "layers_per_block": 2}


def tiny_model(**overrides: object) -> DiADModel:
    torch.manual_seed(0)
    return DiADModel(**{**MODEL_ARGS, **overrides}).eval()


def images(count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def wake_zero_convs(model: DiADModel, seed: int = 3) -> None:
    """Give the zero-initialised SG convs (and SFF convs) small random weights, as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.sg.named_parameters():
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "fusion" in name or "conv_out" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


# --- SG network ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_zero_initialised_sg_leaves_the_denoiser_output_exactly_unchanged() -> None:
    model = tiny_model(**SD_LAYOUT)
    noisy, steps = torch.randn(2, 3, 64, 64), torch.tensor([999, 10])
    context = model.context.expand(2, -1, -1)
    plain = model.denoiser(noisy, steps, context).sample
    assert torch.equal(model.noise_prediction(noisy, steps, images()), plain)
    down, middle = model.sg(noisy, steps, context, images())
    assert len(down) == 12 and all(not r.any() for r in down) and not middle.any()
    wake_zero_convs(model)  # once the zero convs train, the input image steers the denoiser
    guided = model.noise_prediction(noisy, steps, images())
    assert not torch.allclose(guided, plain)
    assert not torch.allclose(guided, model.noise_prediction(noisy, steps, images(seed=5)))


def test_sg_copies_the_denoiser_encoder_and_hint_encoder_is_the_references() -> None:
    model = tiny_model(**SD_LAYOUT)
    copy = model.sg.copy
    for part in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        ours, theirs = getattr(copy, part).state_dict(), getattr(model.denoiser, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
        assert getattr(copy, part) is not getattr(model.denoiser, part)
    # reference hint encoder: 3->16->16->32(s2)->32->96(s2)->96->256(s2), zero conv to the first block's width
    sd = DiADModel(**{**SD_LAYOUT, "hint_channels": [16, 32, 96, 256]}, vae_path=None).sg  # pixel space: no stride
    assert all(conv.stride == (1, 1) for conv in sd.copy.controlnet_cond_embedding.blocks)
    vae_like = _hint_for_factor(8)
    convs = [vae_like.conv_in, *vae_like.blocks]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2),
    ]  # fmt: skip
    assert vae_like.conv_out.out_channels == 16 and not vae_like.conv_out.weight.any()


def _hint_for_factor(factor: int) -> torch.nn.Module:
    from anomalib_dpnr.models.diad.semantic_guided import SemanticGuidedNetwork

    denoiser = build_denoiser(4, (16, 32, 32, 32), 2, (3,), 2, 16, 8)
    return SemanticGuidedNetwork(denoiser, (16, 32, 96, 256), factor).copy.controlnet_cond_embedding


@torch.no_grad()
def test_only_mid_control_controls_the_first_decoder_level_and_full_control_every_skip() -> None:
    noisy, steps = torch.randn(1, 3, 64, 64), torch.tensor([500])
    mid = tiny_model(**SD_LAYOUT)
    assert mid.sg.controlled == [9, 10, 11]
    full = tiny_model(**SD_LAYOUT, only_mid_control=False)
    assert full.sg.controlled == list(range(12))
    for model in (mid, full):
        wake_zero_convs(model)
        down, middle = model.sg(noisy, steps, model.context, images(1))
        assert [bool(r.any()) for r in down] == [i in model.sg.controlled for i in range(12)] and middle.any()
    assert not torch.allclose(mid.noise_prediction(noisy, steps, images(1)), full.noise_prediction(noisy, steps, images(1)))


# --- SFF ----------------------------------------------------------------------------------------------------
def test_sff_shapes_and_its_off_switch() -> None:
    model = tiny_model(**SD_LAYOUT)
    levels, channels = skip_levels(model.denoiser)
    assert levels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    fusion = model.sg.fusion
    assert fusion.sources == [6, 7, 8] and fusion.targets == [9, 10, 11] and sum(len(b) for b in fusion.blocks) == 9
    outputs = [torch.randn(2, c, 64 >> lv, 64 >> lv) for lv, c in zip(levels, channels, strict=True)]
    fused = fusion(outputs)
    assert [f.shape for f in fused] == [o.shape for o in outputs]
    torch.testing.assert_close(fused[9], torch.nn.functional.silu(outputs[9]))  # zero-initialised convs
    assert all(fused[i] is outputs[i] for i in range(9))
    wake_zero_convs(model)
    woken = fusion(outputs)
    assert not torch.allclose(woken[9], fused[9])
    off = tiny_model(**SD_LAYOUT, feature_fusion=False)
    assert off.sg.fusion is None and not any("fusion" in n for n, _ in off.named_parameters())
    off.load_state_dict({k: v for k, v in model.state_dict().items() if "fusion" not in k})
    noisy, steps = torch.randn(1, 3, 64, 64), torch.tensor([500])
    with torch.no_grad():
        assert not torch.allclose(model.noise_prediction(noisy, steps, images(1)), off.noise_prediction(noisy, steps, images(1)))
    with pytest.raises(ValueError, match="source and target"):
        SpatialFeatureFusion([], [1], [4, 4])


# --- what trains --------------------------------------------------------------------------------------------
def test_only_the_sg_network_and_the_denoiser_decoder_get_gradients() -> None:
    model = tiny_model(**SD_LAYOUT).train()
    wake_zero_convs(model)  # at initialisation the zero convs block every gradient into the SG copy
    output = model(images(4))
    torch.nn.functional.mse_loss(output.predicted, output.noise).backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    decoder = [model.denoiser.up_blocks, model.denoiser.conv_norm_out, model.denoiser.conv_out]
    intended = {id(p) for m in [model.sg, *decoder] for p in m.parameters()}
    assert trainable == intended
    for name, parameter in model.named_parameters():
        if id(parameter) in intended:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name  # encoder, middle block, time embedding, backbone
    assert not model.context.requires_grad


def test_lightning_module_optimises_the_trainable_parameters_with_adamw() -> None:
    module = DiAD(**TINY_DIAD)
    optimiser = module.configure_optimizers()
    assert isinstance(optimiser, torch.optim.AdamW) and optimiser.defaults["lr"] == 1e-5
    assert {id(p) for g in optimiser.param_groups for p in g["params"]} == {id(p) for p in module.model.trainable_parameters()}


# --- inference and the map -----------------------------------------------------------------------------------
@torch.no_grad()
def test_identical_input_and_reconstruction_give_a_zero_map_and_the_score_is_its_max() -> None:
    model = tiny_model()
    x = images()
    assert model.anomaly_map(x, x).abs().max() < 1e-5
    assert model.anomaly_map(x, images(seed=4)).min() > 0
    out = model.predict(x)
    assert out.anomaly_map.shape == (2, 1, 64, 64)
    torch.testing.assert_close(out.pred_score, out.anomaly_map.flatten(1).amax(dim=1))
    torch.testing.assert_close(model.predict(x).anomaly_map, out.anomaly_map)  # fixed inference noise


@torch.no_grad()
def test_start_step_and_guidance_scale_change_the_reconstruction() -> None:
    model = tiny_model()
    wake_zero_convs(model)
    x = images()
    base = model.reconstruct(x)
    model.start_step = 500
    assert not torch.allclose(model.reconstruct(x), base)
    model.start_step, model.guidance_scale = 999, 3.0
    assert not torch.allclose(model.reconstruct(x), base)
    with pytest.raises(ValueError, match="needs semantic_guided"):
        tiny_model(semantic_guided=False, guidance_scale=2.0)
    assert tiny_model(semantic_guided=False).sg is None


# --- weights -------------------------------------------------------------------------------------------------
def test_weights_load_from_a_local_folder_and_a_missing_one_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    unet = build_denoiser(4, (16, 32), 1, (1,), 2, 16, 8)
    unet.save_pretrained(tmp_path / "sd" / "unet")
    context = torch.randn(1, 3, 16)
    save_file({"context": context}, str(tmp_path / "sd" / "empty_prompt_embedding.safetensors"))
    model = DiADModel(**{**MODEL_ARGS, "vae_path": str(tmp_path / "vae"), "hint_channels": [8, 16], "unet_path": str(tmp_path / "sd"),
                         "unet_subfolder": "unet", "context_path": str(tmp_path / "sd" / "empty_prompt_embedding.safetensors")})  # fmt: skip
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in unet.state_dict().items())
    assert torch.equal(model.context, context) and model.codec.factor == 2
    assert model.sg.copy.controlnet_cond_embedding.blocks[-1].stride == (2, 2)  # the hint meets the latent grid
    out = model.eval().predict(images(1))
    assert out.anomaly_map.shape == (1, 1, 64, 64)
    half = DiADModel(**{**MODEL_ARGS, "vae_path": str(tmp_path / "vae"), "vae_dtype": "bfloat16", "hint_channels": [8, 16]})
    assert next(half.codec.vae.parameters()).dtype == torch.bfloat16  # frozen VAE in half precision, cast in and out
    assert half.codec.encode(images(1)).dtype == torch.float32 and half.codec.decode(torch.zeros(1, 4, 32, 32)).dtype == torch.float32
    with pytest.raises(ValueError, match="vae_dtype must be one of"):
        DiADModel(**{**MODEL_ARGS, "vae_dtype": "half"})
    with pytest.raises(ValueError, match=r"attention_levels \[7\] must index block_out_channels"):
        DiADModel(**{**MODEL_ARGS, "attention_levels": [7]})
    with pytest.raises(MissingWeightsError, match=r"denoiser folder not found: .*nowhere"):
        DiADModel(**{**MODEL_ARGS, "unet_path": str(tmp_path / "nowhere")})
    with pytest.raises(MissingWeightsError, match=r"could not load the UNet2DConditionModel .*unet_path to null"):
        DiADModel(**{**MODEL_ARGS, "unet_path": str(tmp_path / "vae"), "unet_subfolder": "unet"})
    with pytest.raises(MissingWeightsError, match=r"empty-prompt embedding not found: .*empty_prompt_embedding.safetensors"):
        DiADModel(**{**MODEL_ARGS, "unet_path": str(tmp_path / "sd"), "unet_subfolder": "unet", "vae_path": str(tmp_path / "vae"),
                     "hint_channels": [8, 16], "context_path": str(tmp_path / "empty_prompt_embedding.safetensors")})  # fmt: skip
    with pytest.raises(ValueError, match="hint_downsampling must be a power of 2 reachable"):
        DiADModel(**{**MODEL_ARGS, "vae_path": str(tmp_path / "vae")})  # one hint conv cannot reach the latent grid
    with pytest.raises(ValueError, match=r"needs \[1, tokens, 16\]"):
        save_file({"context": torch.randn(1, 3, 8)}, str(tmp_path / "wrong.safetensors"))
        DiADModel(**{**MODEL_ARGS, "context_path": str(tmp_path / "wrong.safetensors")})


# --- multi-class datamodule ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_categories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    make_synthetic_dataset(root / "nested", category="woven", image_size=64, num_train=4, num_test_good=4, num_test_defect=2, seed=0)
    make_synthetic_dataset(root, category="other", image_size=64, num_train=4, num_test_good=4, num_test_defect=2, seed=1)
    return root


def test_multi_class_datamodule_splits_per_category(two_categories: Path) -> None:
    data = MVTecMultiClass(root=two_categories, categories=["nested/woven", "other"], num_workers=0, val_split_mode="from_test", seed=0)
    data.setup()
    assert len(data.train_data) == 8
    for split in (data.val_data, data.test_data):
        paths = split.samples.image_path.astype(str)
        for category in ("woven", "other"):
            labels = split.samples.label_index[paths.str.contains(f"/{category}/")]
            assert set(labels.tolist()) == {0, 1}, category  # each category keeps good and defective images
    with pytest.raises(ValueError, match="unique names"):
        MVTecMultiClass(root=two_categories, categories=["other", "x/other"])
    with pytest.raises(FileNotFoundError, match="missing_one"):
        MVTecMultiClass(root=two_categories, categories=["other", "missing_one"]).prepare_data()


@pytest.mark.parametrize("model", ["DiAD", "Ran", "Padim"])
def test_multi_class_datamodule_yields_per_category_metrics(model: str, two_categories: Path, tmp_path: Path) -> None:
    data = MVTecMultiClass(
        root=two_categories, categories=["nested/woven", "other"], train_batch_size=4, eval_batch_size=4,
        num_workers=0, val_split_mode="from_test", seed=0,
    )  # fmt: skip
    modules = {
        "DiAD": lambda: DiAD(**TINY_DIAD, seed=0),
        "Ran": lambda: Ran(**TINY_RAN, seed=0),  # RAN's unified setting (the paper's Table 3)
        "Padim": lambda: Padim(backbone="resnet18", pre_trained=False, layers=["layer1", "layer2"]),
    }
    module = modules[model]()
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    (metrics,) = engine.train(module, datamodule=data)
    for category in ("woven", "other"):
        for metric in ("image_AUROC", "pixel_AUROC"):
            assert 0 <= metrics[f"{category}/{metric}"] <= 1, metrics
    assert metrics["woven/image_AUROC"] != metrics["other/image_AUROC"] or metrics["woven/pixel_AUROC"] != metrics["other/pixel_AUROC"]


def test_fit_trains_the_autoencoder_first_then_diffuses_in_its_latent(tiny_dataset: Path, tmp_path: Path) -> None:
    """``autoencoder_channels``: epoch 0 trains the autoencoder, then it is frozen and the denoiser trains in its
    latent (16 x 16 for 64 px); encoder and decoder both shape the map; the checkpoint reloads it exactly."""
    latent = {"autoencoder_channels": [8, 8, 8], "autoencoder_epochs": 1, "hint_channels": [8, 8, 8]}
    module = DiAD(**{**TINY_DIAD, **latent}, seed=0)
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    phases = AutoencoderPhases()
    fit_with(phases, module, tmp_path, 2, tiny_dataset)
    assert phases.phase == {0: {"autoencoder"}, 1: {"denoiser"}}
    logged = {name.removesuffix("_epoch").removesuffix("_step") for name in module.trainer.callback_metrics}
    assert {"train_loss", "train_autoencoder_l1", "train_autoencoder_kl", "latent_scale"} <= logged
    state = module.model.state_dict()
    changed = lambda prefix: any(not torch.equal(v, initial[k]) for k, v in state.items() if k.startswith(prefix))  # noqa: E731
    assert changed("codec.vae.") and changed("denoiser.") and changed("sg.")
    codec = module.model.codec
    assert all(torch.equal(v, phases.after_autoencoder[k]) for k, v in codec.vae.state_dict().items())
    assert float(codec.scale) != 1.0 and module.model.denoiser.config.in_channels == 4
    module.eval()
    batch = sample_images(tiny_dataset)
    assert codec.encode(batch).shape[-2:] == (16, 16)
    (checkpoint,) = tmp_path.glob("**/weights/lightning/model.ckpt")
    reloaded = DiAD.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        before = module(batch).anomaly_map
        assert torch.equal(before, reloaded(batch).anomaly_map)
        next(iter(codec.vae.decoder.parameters())).mul_(1.5)
        after_decoder = module(batch).anomaly_map
        next(iter(codec.vae.encoder.parameters())).mul_(1.5)
        after_encoder = module(batch).anomaly_map
    assert not torch.allclose(before, after_decoder) and not torch.allclose(after_decoder, after_encoder)


def test_trained_autoencoder_arguments_are_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs both autoencoder_channels and autoencoder_epochs"):
        DiAD(**TINY_DIAD, autoencoder_channels=[8, 8])
    with pytest.raises(ValueError, match="the autoencoder trained here stays float32"):
        DiAD(**TINY_DIAD, autoencoder_channels=[8, 8], autoencoder_epochs=1, vae_dtype="bfloat16")
    module = DiAD(**{**TINY_DIAD, "hint_channels": [8, 8]}, autoencoder_channels=[8, 8], autoencoder_epochs=1)
    with pytest.raises(ValueError, match="DiAD: max_epochs=1 leaves no epoch for the denoiser besides autoencoder_epochs=1; raise max_epochs$"):
        fit_with(AutoencoderPhases(), module, tmp_path, 1, tiny_dataset)


# --- configurations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["cpu", "pixel_cpu", "multi_class_cpu"])
def test_cpu_configs_build(config: str) -> None:
    module = DiAD(**{**config_file("diad", config)["model"]["init_args"], "pre_trained": False})
    latent = module.model.codec.vae is not None
    assert latent == (config == "cpu") and module.autoencoder_epochs == (10 if latent else 0)
    grid = module.model.codec.encode(torch.zeros(1, 3, 128, 128)).shape[-2:]
    assert grid == ((32, 32) if latent else (128, 128))


def test_cpu_config_is_pixel_cpu_with_a_trained_autoencoder() -> None:
    """The shipped CPU config diffuses in a trained autoencoder's latent: the pixel config plus the autoencoder,
    its 10 epochs before the same 24 denoiser epochs, and a hint encoder that reaches the 32x32 latent grid."""
    latent, pixel = config_file("diad"), config_file("diad", "pixel_cpu")
    args, pixel_args = latent["model"]["init_args"], pixel["model"]["init_args"]
    added = {key: value for key, value in args.items() if key not in pixel_args}
    assert added.pop("autoencoder_channels") == [32, 64, 128] and added.pop("autoencoder_epochs") == 10
    assert set(added) == {"latent_channels", "autoencoder_learning_rate", "autoencoder_kl_weight"}
    assert (pixel_args["hint_channels"], args["hint_channels"]) == ([16], [16, 32, 64])
    assert {key: value for key, value in pixel_args.items() if key != "hint_channels"} == {
        key: args[key] for key in pixel_args if key != "hint_channels"
    }
    for key in ("max_epochs", "check_val_every_n_epoch"):
        assert latent["trainer"][key] - pixel["trainer"][key] == 10
    assert latent["data"] == pixel["data"]
