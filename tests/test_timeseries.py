"""Forecasting data: synthetic series, loaders and their errors, cleaning in chunks, windows, split, scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.forecasting.data import (
    Cleaning,
    ForecastDataModule,
    WindowTransform,
    chunk_bounds,
    clean_chunk,
    errors,
    fit_scaler,
    fit_transform,
    load_date_value,
    load_nyt_state,
    make_windows,
    persistence,
    seasonal_naive,
    sir_series,
    split_index,
)
from tests.shared_data import shared_data

TENNESSEE = "tennessee-covid19-nyt.csv"  # in ../shared/data


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- synthetic series ---------------------------------------------------------------------------------------------


def test_sir_series_is_seeded_and_shaped_like_tennessee() -> None:
    cumulative = sir_series(766, seed=3)
    assert np.array_equal(cumulative, sir_series(766, seed=3))
    assert not np.array_equal(cumulative, sir_series(766, seed=4))
    assert cumulative.shape == (766,)
    assert np.all(np.diff(cumulative) >= 0)
    active = Cleaning()(cumulative)
    assert 150_000 < active.max() <= 200_500
    # several waves: local maxima of the active series that stand well above their surroundings
    peaks = [d for d in range(30, 736) if active[d] == active[d - 30 : d + 31].max() and active[d] > 20_000]
    assert len(peaks) >= 3, peaks
    # weekly reporting rhythm: weekend days report clearly less than weekdays
    daily = np.diff(cumulative)
    by_weekday = [daily[k::7].mean() for k in range(7)]
    assert min(by_weekday) < 0.5 * max(by_weekday)


# -- loaders and their errors ------------------------------------------------------------------------------------------


def test_nyt_loader_reads_tennessee() -> None:
    tennessee = shared_data(TENNESSEE)
    cumulative = load_nyt_state(tennessee, "Tennessee", days=766)
    assert cumulative.shape == (766,)
    assert cumulative[0] == 1
    assert cumulative[3] == 3
    active = Cleaning()(cumulative)
    assert 225_000 < active.max() < 235_000  # the Omicron peak, ~230,000 active cases
    with pytest.raises(ValueError, match="fewer than the 5000 days"):
        load_nyt_state(tennessee, "Tennessee", days=5000)


def test_nyt_loader_errors(tmp_path: Path) -> None:
    good = "date,state,fips,cases,deaths\n2020-03-01,Utah,49,1,0\n2020-03-02,Utah,49,3,0\n"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nyt_state(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="State 'Tennessee' is not in .*Utah"):
        load_nyt_state(write(tmp_path, good), "Tennessee")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['cases'\]"):
        load_nyt_state(write(tmp_path, "date,state,deaths\n2020-03-01,Utah,0\n"), "Utah")
    with pytest.raises(ValueError, match="missing or non-numeric"):
        load_nyt_state(write(tmp_path, good + "2020-03-03,Utah,49,,0\n"), "Utah")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        load_nyt_state(write(tmp_path, good + "03/04/2020,Utah,49,5,0\n"), "Utah")
    with pytest.raises(ValueError, match="more than once"):
        load_nyt_state(write(tmp_path, good + "2020-03-02,Utah,49,4,0\n"), "Utah")
    with pytest.raises(ValueError, match="not a readable CSV"):
        load_nyt_state(write(tmp_path, ""), "Utah")


def test_missing_days_are_interpolated_and_rows_sorted(tmp_path: Path) -> None:
    path = write(tmp_path, "date,state,cases\n2020-03-05,X,30\n2020-03-01,X,10\n2020-03-02,X,14\n")
    np.testing.assert_allclose(load_nyt_state(path, "X"), [10.0, 14.0, 14 + 16 / 3, 14 + 32 / 3, 30.0])


def test_date_value_loader(tmp_path: Path) -> None:
    path = write(tmp_path, "date,value\n2021-01-01,5\n2021-01-02,7\n2021-01-04,11\n")
    assert load_date_value(path).tolist() == [5.0, 7.0, 9.0, 11.0]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['value'\]"):
        load_date_value(write(tmp_path, "date,count\n2021-01-01,2\n", "other.csv"))


# -- cleaning -------------------------------------------------------------------------------------------------------


def test_cleaning_clips_corrections_and_caps_outliers() -> None:
    cumulative = np.array([0, 10, 20, 15, 25, 35], dtype=float)  # a downward correction of 5
    assert Cleaning(active_days=1)(cumulative).tolist() == [0, 10, 10, 0, 10, 10]
    assert Cleaning(active_days=2)(cumulative).tolist() == [0, 10, 20, 10, 10, 20]
    daily = np.full(30, 100.0)
    daily[15] = 5000.0  # a backlog dump
    capped = Cleaning(cumulative=False, active_days=1, outlier_factor=3.0)(daily)
    assert capped[15] == 300.0
    assert np.all(np.delete(capped, 15) == 100.0)


@pytest.mark.parametrize(
    "cleaning", [Cleaning(), Cleaning(outlier_factor=2.5), Cleaning(cumulative=False, active_days=7)]
)
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_chunks_with_halos_equal_the_whole_series_bit_for_bit(cleaning: Cleaning, parts: int) -> None:
    raw = sir_series(400, seed=1) if cleaning.cumulative else np.random.default_rng(0).gamma(2.0, 500.0, 400)
    whole = cleaning(raw)
    chunks = [clean_chunk(raw, cleaning, parts, p) for p in range(parts)]
    assert [len(c) for c in chunks] == [b - a for a, b in (chunk_bounds(400, parts, p) for p in range(parts))]
    assert np.array_equal(np.concatenate(chunks), whole)


# -- windows, split, scaling -------------------------------------------------------------------------------------------


def test_windows_and_time_ordered_split() -> None:
    x, y = make_windows(np.arange(100.0), window=14, horizon=3)
    assert x.shape == (84, 14)
    assert y.shape == (84, 3)
    assert x[5].tolist() == list(range(5, 19))
    assert y[5].tolist() == [19, 20, 21]
    cut = split_index(len(x), 0.8)
    assert cut == 67
    assert x[cut - 1, -1] < x[cut, -1]
    with pytest.raises(ValueError, match="too short"):
        make_windows(np.arange(15.0), window=14, horizon=1)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_index(10, 1.0)


def test_scaler_statistics_come_from_training_values_only() -> None:
    assert fit_scaler(np.array([3.0, -1.0, 7.0]), "minmax") == (-1.0, 8.0)
    assert fit_scaler(np.array([3.0, -9.0, 7.0]), "maxabs") == (0.0, 9.0)
    with pytest.raises(ValueError, match="Unknown scaler"):
        fit_scaler(np.ones(3), "robust")  # type: ignore[arg-type]
    series = np.concatenate([np.linspace(10, 100, 80), np.full(20, 1e6)])  # a test period far above the train range
    x, y = make_windows(series, 5)
    transform = fit_transform(x[:60], y[:60], "level", "minmax")
    assert transform.offset == 10.0
    assert transform.scale < 100.0


@pytest.mark.parametrize("kind", ["level", "logratio"])
def test_transform_round_trip_in_case_counts(kind: str) -> None:
    x, y = make_windows(sir_series(200, seed=2), window=14, horizon=2)
    transform = fit_transform(x[:150], y[:150], kind, "maxabs")  # type: ignore[arg-type]
    z = torch.tensor(transform.targets(y, x))
    back = transform.inverse(z, torch.tensor(x[:, -1:])).numpy()
    np.testing.assert_allclose(back, y, rtol=1e-9, atol=1e-6)


def test_logratio_inputs_are_scale_free() -> None:
    x = np.array([[10.0, 20.0, 40.0]])
    transform = WindowTransform("logratio", 0.0, 1.0)
    np.testing.assert_allclose(transform.inputs(x), transform.inputs(x * 1000 + 999), atol=1e-3)


def test_baselines() -> None:
    x = np.arange(20.0).reshape(2, 10)
    assert persistence(x, 2).tolist() == [[9, 9], [19, 19]]
    assert seasonal_naive(x, 8).tolist()[0] == [3, 4, 5, 6, 7, 8, 9, 3]
    with pytest.raises(ValueError, match="at least 7 days"):
        seasonal_naive(x[:, :5], 1)


def test_datamodule_on_tennessee_reproduces_the_persistence_figure() -> None:
    data = ForecastDataModule(source="nyt", path=str(shared_data(TENNESSEE)), transform="level", scaler="minmax")
    data.prepare()
    assert data.split == 601
    assert len(data.x) == 752
    baselines = data.baselines()
    assert round(baselines["persistence"]["rmse"]) == 8262
    assert baselines["seasonal7"]["rmse"] > baselines["persistence"]["rmse"]
    train_days = data.series[: data.split + data.window]  # every value a training window or target touches
    assert (data.transform.offset, data.transform.scale) == (train_days.min(), train_days.max() - train_days.min())
    x, y, last, raw = next(iter(data.test_dataloader()))
    assert x.shape == (128, 14, 1)
    assert y.shape == (128, 1)
    assert last.shape == (128, 1)
    assert float(x.max()) > 1.0  # the test period lies above the training range
    assert errors(raw.numpy(), data.test_windows()[1][:128])["rmse"] < 1.0


def test_datamodule_errors_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs data.path"):
        ForecastDataModule(source="nyt").prepare()
    with pytest.raises(ValueError, match="Unknown data source"):
        ForecastDataModule(source="excel", path="x.xlsx").prepare()
    with pytest.raises(ValueError, match="too short"):
        ForecastDataModule(source="sir", days=15, window=14).prepare()
    with pytest.raises(ValueError, match="Unknown transform"):
        ForecastDataModule(source="sir", transform="boxcox").prepare()  # type: ignore[arg-type]
