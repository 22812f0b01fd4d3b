"""Proof that training works: every model, briefly trained on generated data, ranks defective images above good ones.

A model whose output is constant (or unrelated to the image) scores an image AUROC of 0.5 here and fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from conftest import MODELS, PROOF
from test_reliability import build, engine


@pytest.fixture(scope="module")
def proof_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 good and 16 defective test images (half of each scores, the other half fits thresholds)."""
    from anomalib_dpnr.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("proof"), image_size=64, num_train=16, num_test_good=16, num_test_defect=16)


# Known limit, kept visible: the tiny DiAD does not learn the generated data in 2 short epochs (8 steps): from its
# start step its noise estimate is not yet accurate enough for a reconstruction, and the random-init backbone then
# scores the flat painted defects below the texture (image AUROC 0.23-0.39 over learning rates 2e-3..1e-2, start
# steps 200-999 and full control). strict: the suite fails as soon as it passes, so the mark goes with the fix.
# The tiny DiffusionAD does not either: image AUROC 0.52-0.72 over model seeds 0-4 after 2 epochs, and no better after
# 6 or 12 (0.21-0.69 for seeds 1-3); its segmentation loss outweighs the noise loss at initialisation.
KNOWN_FAILURES = {
    "DiAD": "tiny DiAD does not learn the generated data in 2 short epochs (DiAD README, Limits)",
    "DiffusionAD": "tiny DiffusionAD does not learn the generated data in a short training (DiffusionAD README, Limits)",
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[n])) if n in KNOWN_FAILURES else n for n in MODELS]
)
def test_short_training_ranks_defects_above_normal_images(name: str, proof_dataset: Path, tmp_path: Path) -> None:
    module = build(name, seed=0, **PROOF[name])
    data = MVTecAD(root=proof_dataset, category="woven", train_batch_size=4, eval_batch_size=8, num_workers=0, val_split_mode="from_test", seed=0)
    eng = engine(tmp_path, max_epochs=2)
    eng.fit(module, datamodule=data)
    (metrics,) = eng.test(module, datamodule=data)
    assert metrics["image_AUROC"] >= 0.8, metrics
    predictions = eng.predict(module, datamodule=data)
    scores = torch.cat([batch.pred_score for batch in predictions])
    assert scores.std() > 0, "the model gives every image the same score"
