"""Map statistics (components/statistics.py): one fit, three readings, no batch dependence."""

from __future__ import annotations

import pytest
import torch

from anomalib_dpnr.components.statistics import READINGS, MapAccumulator, MapStatistics


def normal_maps(seed: int = 0) -> torch.Tensor:
    """``[2 terms, 6 images, 1, 4, 4]`` maps, one position high on every normal image (a border, say)."""
    maps = torch.rand(2, 6, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    maps[..., 0, 0] += 5.0
    return maps


def fitted(maps: torch.Tensor, shrinkage: float = 0.1) -> MapStatistics:
    accumulator = MapAccumulator()
    accumulator.add(maps[:, :3]), accumulator.add(maps[:, 3:])  # in two batches
    statistics = MapStatistics((maps.shape[0],), tuple(maps.shape[-2:]), shrinkage)
    statistics.fit(accumulator.result())
    return statistics


def test_accumulator_matches_the_statistics_of_all_images_at_once() -> None:
    maps = normal_maps()
    statistics = fitted(maps)
    flat = maps.flatten(1)
    torch.testing.assert_close(statistics.low, flat.amin(dim=1))
    torch.testing.assert_close(statistics.high, flat.amax(dim=1))
    torch.testing.assert_close(statistics.mean, flat.mean(dim=1))
    torch.testing.assert_close(statistics.std, flat.std(dim=1, unbiased=False))
    torch.testing.assert_close(statistics.position_mean, maps.mean(dim=1)[:, 0])  # [terms, H, W]
    torch.testing.assert_close(statistics.position_std, maps.std(dim=1, unbiased=False)[:, 0])
    assert bool(statistics.fitted)


def test_readings_normalise_as_documented() -> None:
    maps = normal_maps()
    statistics = fitted(maps)
    test = torch.rand(1, 1, 4, 4)
    low, high, mean, std = statistics.low[1], statistics.high[1], statistics.mean[1], statistics.std[1]
    torch.testing.assert_close(statistics(test, 1, "minmax"), (test - low) / (high - low))
    torch.testing.assert_close(statistics(test, 1, "standard"), (test - mean) / std)
    variance = statistics.position_std[1] ** 2 + 0.1 * std**2
    torch.testing.assert_close(statistics(test, 1, "position"), (test - statistics.position_mean[1]) / variance.sqrt())
    outputs = [statistics(test, 0, reading) for reading in READINGS]
    assert all(not torch.allclose(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1 :])


def test_position_reading_discounts_only_positions_high_on_normal_images() -> None:
    statistics = fitted(normal_maps())
    test = torch.full((1, 1, 4, 4), 0.5)
    test[..., 0, 0] = test[..., 2, 2] = 5.5  # the usual border value and a real anomaly of the same height
    standard, position = (statistics(test, 0, reading)[0, 0] for reading in ("standard", "position"))
    assert standard[0, 0] == standard[2, 2]  # over all pixels: the border looks as anomalous as the defect
    assert position[2, 2] > position[0, 0] + 5  # per position: only the defect stands out


def test_shrinkage_keeps_constant_positions_finite() -> None:
    maps = normal_maps()
    maps[..., 3, 3] = 0.5  # a constant background position: its own variance is 0
    scores = [fitted(maps, shrinkage)(torch.full((1, 1, 4, 4), 0.6), 0, "position")[0, 0, 3, 3] for shrinkage in (0.0, 0.1)]
    assert scores[0] > 1e9 and scores[1] < 10  # the ridge keeps a 0.1 step on a constant position a modest score


def test_statistics_do_not_depend_on_the_batch_scored() -> None:
    statistics = fitted(normal_maps())
    test = torch.rand(1, 1, 4, 4)
    batch = torch.cat([test, torch.full((1, 1, 4, 4), 100.0)])
    for reading in READINGS:
        torch.testing.assert_close(statistics(batch, 0, reading)[:1], statistics(test, 0, reading))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="positional_shrinkage must be >= 0"):
        MapStatistics((2,), (4, 4), shrinkage=-1)
    statistics = fitted(normal_maps())
    with pytest.raises(ValueError, match="per-position statistics are 4x4, the maps 8x8"):
        statistics(torch.zeros(1, 1, 8, 8), 0, "position")
    with pytest.raises(ValueError, match="read as one of"):
        statistics(torch.zeros(1, 1, 4, 4), 0, "zscore")
    with pytest.raises(ValueError, match=r"lack \['position_mean', 'position_std'\]"):
        statistics.fit({"low": torch.zeros(2), "high": torch.ones(2), "mean": torch.zeros(2), "std": torch.ones(2)})
    with pytest.raises(ValueError, match="no maps were added"):
        MapAccumulator().result()
    with pytest.raises(ValueError, match=r"maps must be \[\*slots, B, 1, H, W\]"):
        MapAccumulator().add(torch.zeros(2, 3, 4, 4))


def test_per_position_statistics_load_at_their_fitted_size() -> None:
    source = fitted(normal_maps())
    target = MapStatistics((2,), (8, 8))
    target.load_state_dict(source.state_dict())
    assert target.size == (4, 4) and bool(target.fitted)
    torch.testing.assert_close(target.position_mean, source.position_mean)
