"""Deployment (issue 18) for every model in ``conftest.MODELS``: exported graphs take images of any size.

Each model trains once (module-scoped ``deployed``) at ``image_size`` 64 on a generated dataset of 96 px
images, with one inference noise level (each level is another copy of the graph: export time), predicts
that dataset's test images through ``Engine.predict`` (what ``anomalib predict`` runs) and is exported
through ``Engine.export`` (what ``anomalib export`` runs) to torch, ONNX and OpenVINO. Every inferencer is
fed the files as they are read and must give ``predict``'s scores and anomaly maps.

OpenVINO export and inference run in a child process (:data:`OPENVINO_CHILD`): once the OpenVINO runtime is
loaded, a later SIGTERM in the same process (``test_reliability``'s interrupt test) crashes it.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import ExportType
from conftest import MODELS
from test_reliability import build as tiny_model
from test_reliability import datamodule
from test_reliability import engine as cpu_engine
from torchvision.transforms.v2 import Resize

import anomalib_dpnr
from anomalib_dpnr.components import base
from anomalib_dpnr.components.base import DiffusionAnomalyModule
from anomalib_dpnr.components.processing import MatrixResize
from anomalib_dpnr.data import make_synthetic_dataset

SIZE = 96  # the dataset's images; the tiny models run at 64
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
# OpenVINO converts the ONNX graph that every model's ONNX test checks at any size; its own export path (Engine.export,
# the child process, the inferencer) is the same for every model and costs ~40 s each: it runs for the headline model.
OPENVINO_MODELS = ["Dpnr"]
# argv: model name, checkpoint, export root, images (JSON). Exports through Engine.export, checks the dynamic
# input, prints {"f32"|"default": {image: [score, map]}} from OpenVINOInferencer on the files as read.
OPENVINO_CHILD = """
import json, sys
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.engine import Engine
import anomalib_dpnr
name, ckpt, root, images = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
module = getattr(anomalib_dpnr, name).load_from_checkpoint(ckpt).eval()
path = Engine(default_root_dir=root, accelerator="cpu", logger=False).export(module, ExportType.OPENVINO, export_root=root)
out = {}
for key, config in (("f32", %r), ("default", None)):
    inferencer = OpenVINOInferencer(path=path, device="CPU", config=config)
    shape = inferencer.input_blob.get_partial_shape()
    out["dynamic"] = [shape[i].is_dynamic for i in range(4)]
    out[key] = {}
    for image in images:
        got = inferencer.predict(image)
        out[key][image] = [float(got.pred_score.reshape(())), got.anomaly_map.reshape(-1).tolist()]
print("OPENVINO " + json.dumps(out))
""" % (F32,)


def build(name: str, **overrides: object) -> DiffusionAnomalyModule:
    """The tiny configuration of model ``name``, with one inference noise level where it has several."""
    default = inspect.signature(getattr(anomalib_dpnr, name)).parameters.get("inference_timesteps")
    if default is not None and "inference_timesteps" not in {**MODELS[name][1], **overrides}:
        overrides["inference_timesteps"] = list(default.default)[:1]
    return tiny_model(name, **overrides)


def unit_normalisation(module: DiffusionAnomalyModule) -> None:
    """Normalisation range [0, 1], thresholds 0.5: a 1-epoch tiny model scores every image alike (fitted
    min = max), and min-max normalisation then magnifies 1e-8 float differences into failures."""
    post = module.post_processor
    post.load_state_dict({k: torch.full_like(v, 0.5 if "threshold" in k else float("max" in k)) for k, v in post.state_dict().items()})


@dataclass
class Deployed:
    """A trained model, ``predict``'s outputs per test file and the exported files."""

    module: DiffusionAnomalyModule
    predicted: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (pred_score, anomaly_map [64, 64])
    exported: dict[ExportType, Path]  # torch and ONNX (OpenVINO is exported by OPENVINO_CHILD)
    checkpoint: Path  # the trained model with its unit normalisation, for OPENVINO_CHILD


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data96"), image_size=SIZE, num_train=8, num_test_good=2, num_test_defect=2)


@pytest.fixture(scope="module", params=list(MODELS))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def deployed(name: str, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    root = tmp_path_factory.mktemp(f"deploy_{name}")
    module = build(name, seed=0)
    engine = cpu_engine(root)
    engine.fit(module, datamodule=datamodule(data))
    unit_normalisation(module.eval())
    batches = engine.predict(module, data_path=data / "woven" / "test", return_predictions=True)
    predicted = {
        path: (score, anomaly_map.reshape(anomaly_map.shape[-2:]))
        for batch in batches
        for path, score, anomaly_map in zip(batch.image_path, batch.pred_score.reshape(-1), batch.anomaly_map, strict=True)
    }
    exported = {kind: engine.export(module, kind, export_root=root) for kind in (ExportType.TORCH, ExportType.ONNX)}
    engine.trainer.save_checkpoint(root / "deployed.ckpt")
    return Deployed(module, predicted, exported, root / "deployed.ckpt")


def assert_matches_predict(deployed: Deployed, path: str, score: object, anomaly_map: object, atol: float) -> None:
    expected_score, expected_map = deployed.predicted[path]
    got_map = torch.as_tensor(anomaly_map).reshape(-1, *expected_map.shape)
    assert got_map.shape[0] == 1, path
    torch.testing.assert_close(torch.as_tensor(score).reshape(()), expected_score, atol=atol, rtol=0, msg=path)
    torch.testing.assert_close(got_map[0], expected_map, atol=atol, rtol=0, msg=path)


def test_matrix_resize_is_torchvisions_antialiased_resize() -> None:
    """The resize inside exported graphs computes what ``predict``'s pre-processing does (any size, up or down)."""
    for size in [(96, 96), (80, 48), (900, 700), (64, 64), (48, 40), (63, 65)]:
        images = torch.rand(2, 3, *size)
        torch.testing.assert_close(MatrixResize((64, 64))(images), Resize((64, 64), antialias=True)(images), atol=1e-6, rtol=0)


@pytest.mark.slow  # the first test per model trains and exports it (here: DiffusionAD ~50 s, Dpnr ~2 min)
def test_torch_inferencer_matches_predict(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    from anomalib.deploy import TorchInferencer

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    inferencer = TorchInferencer(path=deployed.exported[ExportType.TORCH], device="cpu")
    for path in deployed.predicted:
        got = inferencer.predict(path)  # the 96 px file as read: the embedded pre-processor resizes
        assert_matches_predict(deployed, path, got.pred_score.detach(), got.anomaly_map.detach(), atol=1e-5)


@pytest.mark.slow
def test_onnx_export_takes_any_image_size(deployed: Deployed) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(deployed.exported[ExportType.ONNX]))
    assert [str(d) for d in session.get_inputs()[0].shape] != ["1", "3", "64", "64"]  # batch, height, width dynamic
    paths = list(deployed.predicted)
    images = torch.stack([read_image(path, as_tensor=True) for path in paths])  # [N, 3, 96, 96], one batch
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    for index, path in enumerate(paths):
        assert_matches_predict(deployed, path, outputs["pred_score"][index], outputs["anomaly_map"][index], atol=1e-4)
    odd = torch.nn.functional.interpolate(images[:2], size=(80, 48), mode="bilinear")  # non-square, another size
    outputs = dict(zip(names, session.run(None, {"input": odd.numpy()}), strict=True))
    with torch.no_grad():
        expected = deployed.module(odd)
    torch.testing.assert_close(torch.from_numpy(outputs["pred_score"]), expected.pred_score, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(outputs["anomaly_map"]), expected.anomaly_map, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.only_models(*OPENVINO_MODELS)
def test_openvino_export_takes_any_image_size(deployed: Deployed, name: str, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    images = list(deployed.predicted)
    child = [sys.executable, "-c", OPENVINO_CHILD, name, str(deployed.checkpoint), str(tmp_path), json.dumps(images)]
    done = subprocess.run(child, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)  # ./openvino_cache
    found = [line for line in done.stdout.splitlines() if line.startswith("OPENVINO ")]
    assert done.returncode == 0 and found, done.stdout[-2000:] + done.stderr[-4000:]
    out = json.loads(found[-1].removeprefix("OPENVINO "))
    assert out["dynamic"] == [True, False, True, True]
    # f32 within 1e-3; OpenVINO's default precision is bf16 on CPUs that have it: about 1e-3 off. (D3AD's start step is
    # a histogram bin of a kNN distance, which bf16 can move to the next bin, and DiAD runs DDIM from pure noise, which
    # amplifies bf16 rounding: their READMEs say to deploy them in f32.)
    for key, atol in (("f32", 1e-3), ("default", 1e-2)):
        for image in images:  # the 96 px files as read, as anomalib's inferencers feed them
            score, anomaly_map = out[key][image]
            assert_matches_predict(deployed, image, score, anomaly_map, atol=atol)


def test_export_errors_say_why(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"without a Resize in its pre-processor.*input_size"):
        build(name, pre_processor=False).to_onnx(tmp_path)
    monkeypatch.setattr(base, "module_available", lambda module: module != "openvino")
    with pytest.raises(ModuleNotFoundError, match=r"OpenVINO export needs the openvino package: pip install 'anomalib-dpnr\[openvino\]'"):
        build(name).to_openvino(tmp_path)
    assert not list(tmp_path.iterdir())  # refused before anything was written
