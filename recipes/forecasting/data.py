"""Daily case-count series for forecasting: a synthetic epidemic, CSV loaders, windows and MPI-parallel preparation.

The pipeline, in order:

1. a raw series: :func:`sir_series` (synthetic), :func:`load_nyt_state` (cumulative counts per state, the NYT
   ``us-states.csv`` layout) or :func:`load_date_value` (a plain ``date,value`` CSV);
2. cleaning, split in contiguous chunks over MPI ranks (:func:`clean_parallel`): cumulative -> daily new cases
   (negative corrections clipped to 0), optional outlier capping, 14-day rolling sum as the active-cases proxy;
3. windows of ``window`` past days -> the next ``horizon`` days (:func:`make_windows`), split 80/20 in time order;
4. a :class:`WindowTransform` whose scaler is fitted on the training part only, its statistics combined over
   ranks with an allreduce (:func:`fit_scaler`): identical to the statistics one process would compute.

Every step is deterministic, so all ranks end with the same arrays. Only :mod:`lightning_mpi.comm` talks to MPI.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_mpi.comm import Communicator, world

Kind = Literal["level", "logratio"]
ScalerKind = Literal["minmax", "maxabs"]


# -- raw series ------------------------------------------------------------------------------------------------


def sir_series(
    days: int = 766,
    seed: int = 0,
    population: float = 6.9e6,
    waves: tuple[tuple[int, float], ...] = ((40, 0.14), (270, 0.18), (520, 0.22), (680, 0.34)),
    infectious_days: float = 7.0,
    immunity_days: float = 240.0,
    peak_active: float = 200_000.0,
    weekly: tuple[float, ...] = (1.05, 1.1, 1.05, 1.0, 0.95, 0.55, 0.3),
    noise: float = 0.08,
) -> np.ndarray:
    """A synthetic CUMULATIVE case count shaped like Tennessee 2020-2022 (for tests, demos, no download).

    A discrete SIRS model (waning immunity lets later waves happen): the contact rate is a baseline plus one
    bump per ``(day, strength)`` of ``waves``, so the series has several waves of growing size. Reported daily
    cases are new infections times a weekday factor (``weekly``, low at weekends: the reporting rhythm) times
    log-normal noise (``noise``), scaled so that the 14-day active proxy peaks at ``peak_active`` (~200k cases
    like Tennessee's largest wave). Cumulating gives a series in the same form as the NYT file.
    The same ``seed`` always gives the same series.
    """
    if days < 1:
        raise ValueError(f"days must be positive, got {days}.")
    rng = np.random.default_rng(seed)
    t = np.arange(days)
    beta = 0.08 + sum(strength * np.exp(-0.5 * ((t - day) / 45.0) ** 2) for day, strength in waves)
    gamma, waning = 1.0 / infectious_days, 1.0 / immunity_days
    s, i, r = population - 50.0, 50.0, 0.0
    new = np.empty(days)
    for d in range(days):
        infections = beta[d] * s * i / population
        recoveries, returns = gamma * i, waning * r
        s, i, r = s - infections + returns, i + infections - recoveries, r + recoveries - returns
        new[d] = infections
    reported = new * np.resize(np.asarray(weekly), days) * rng.lognormal(0.0, noise, days)
    active = rolling_sum(reported, 14)
    reported *= peak_active / active.max()
    return np.cumsum(np.round(reported))


def _read_csv(path: str | os.PathLike, required: tuple[str, ...]):  # -> pandas.DataFrame
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Data file {str(path)!r} does not exist (resolved: {path.resolve()}). Point data.path= at the New York "
            "Times us-states.csv (docs/recipes.md says where to download it), or use the embedded SIR epidemic: "
            "data=sir."
        )
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a readable CSV file: {error}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}, needs {list(required)}.")
    try:
        frame["date"] = pd.to_datetime(frame["date"], format="%Y-%m-%d")
    except ValueError as error:
        raise ValueError(f"{path}: the 'date' column must hold YYYY-MM-DD dates: {error}") from None
    return frame


def _daily(frame, value: str, path: str | os.PathLike):  # -> pandas.Series indexed by every day
    """One value per calendar day; missing days are interpolated linearly (counts between two reports)."""
    import pandas as pd

    values = pd.to_numeric(frame[value], errors="coerce")
    bad = values.isna()
    if bad.any():
        rows = (frame.index[bad] + 2).tolist()[:5]  # +2: header line and 1-based lines
        raise ValueError(f"{path}: column {value!r} has missing or non-numeric values (lines {rows}...).")
    series = pd.Series(values.to_numpy(float), index=frame["date"])
    if series.index.has_duplicates:
        dupes = series.index[series.index.duplicated()].strftime("%Y-%m-%d").tolist()[:5]
        raise ValueError(f"{path}: dates occur more than once: {dupes}.")
    series = series.sort_index()
    full = pd.date_range(series.index[0], series.index[-1], freq="D")
    return series.reindex(full).interpolate("linear")


def load_nyt_state(path: str | os.PathLike, state: str = "Tennessee", days: int | None = None) -> np.ndarray:
    """Cumulative cases of ``state`` from an NYT ``us-states.csv``-style file (``date,state,...,cases``).

    Returns the first ``days`` days (all if ``None``), one value per day; missing days are interpolated.
    """
    frame = _read_csv(path, ("date", "state", "cases"))
    rows = frame[frame["state"] == state]
    if rows.empty:
        known = sorted(frame["state"].dropna().unique().tolist())
        raise ValueError(f"State {state!r} is not in {path}; it has: {', '.join(known[:60])}.")
    return _take(_daily(rows.reset_index(drop=True), "cases", path).to_numpy(), days, path)


def first_date(path: str | os.PathLike, state: str | None = None) -> np.datetime64:
    """The first day of the series a loader reads from ``path`` (of ``state``'s rows, for an NYT file)."""
    frame = _read_csv(path, ("date",))
    if state is not None and "state" in frame:
        frame = frame[frame["state"] == state]
    return np.datetime64(frame["date"].min().date(), "D")


def load_date_value(path: str | os.PathLike, days: int | None = None, value: str = "value") -> np.ndarray:
    """A plain ``date,value`` CSV (``value`` already daily, e.g. active cases), one value per day."""
    frame = _read_csv(path, ("date", value))
    return _take(_daily(frame, value, path).to_numpy(), days, path)


def _take(values: np.ndarray, days: int | None, path: str | os.PathLike) -> np.ndarray:
    if days is not None and days > len(values):
        raise ValueError(f"{path} has {len(values)} days, fewer than the {days} days asked for.")
    return values if days is None else values[:days]


# -- cleaning, in chunks over ranks ------------------------------------------------------------------------------


def rolling_sum(values: np.ndarray, days: int) -> np.ndarray:
    """Sum of the last ``days`` values at each position (fewer at the start).

    Each sum adds the same values in the same order wherever the series is cut, so chunked results are exact.

    >>> rolling_sum(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist()
    [1.0, 3.0, 5.0, 7.0]
    """
    padded = np.concatenate([np.zeros(days - 1), np.asarray(values, dtype=np.float64)])
    return np.lib.stride_tricks.sliding_window_view(padded, days).sum(axis=1)


@dataclass(frozen=True)
class Cleaning:
    """How a raw series becomes the active-cases series.

    Args:
        cumulative: the raw values are cumulative counts (difference them) rather than daily values.
        active_days: length of the rolling sum of daily cases (the active-cases proxy); 1 keeps daily values.
        outlier_factor: cap a daily value at this multiple of the median of the 15 days around it (backlog
            dumps); ``None`` keeps every value.
    """

    cumulative: bool = True
    active_days: int = 14
    outlier_factor: float | None = None

    @property
    def halo(self) -> tuple[int, int]:
        """Days of context each output day needs on the left and on the right."""
        reach = 7 if self.outlier_factor is not None else 0
        return reach + self.active_days - 1, reach

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """The single-process reference: clean the whole series at once."""
        daily = np.diff(raw, prepend=0.0) if self.cumulative else np.asarray(raw, dtype=np.float64)
        daily = np.clip(daily, 0.0, None)  # downward corrections of cumulative counts are not negative cases
        if self.outlier_factor is not None:
            daily = np.minimum(daily, self.outlier_factor * _centered_median(daily, 7))
        return rolling_sum(daily, self.active_days)


def _centered_median(values: np.ndarray, reach: int) -> np.ndarray:
    padded = np.pad(values, reach, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1)
    return np.nanmedian(windows, axis=1)


def chunk_bounds(n: int, parts: int, part: int) -> tuple[int, int]:
    """Contiguous block ``part`` of ``range(n)`` cut into ``parts`` nearly equal blocks.

    >>> [chunk_bounds(7, 3, p) for p in range(3)]
    [(0, 3), (3, 5), (5, 7)]
    """
    start = part * (n // parts) + min(part, n % parts)
    return start, start + n // parts + (1 if part < n % parts else 0)


def clean_chunk(raw: np.ndarray, cleaning: Cleaning, parts: int, part: int) -> np.ndarray:
    """Block ``part`` of ``cleaning(raw)``, computed from that block plus its halo only.

    Every step is local in time, so a halo wide enough for all of them makes the block equal to the same block
    of the whole-series result, bit for bit.
    """
    start, stop = chunk_bounds(len(raw), parts, part)
    left, right = cleaning.halo
    lo, hi = max(0, start - left), min(len(raw), stop + right)
    if cleaning.cumulative and lo > 0:
        lo -= 1  # differencing needs the day before the halo; that day's own difference is never kept
    return cleaning(raw[lo:hi])[start - lo : stop - lo]


def clean_parallel(raw: np.ndarray, cleaning: Cleaning, comm: Communicator | None = None) -> np.ndarray:
    """``cleaning(raw)``, each rank cleaning one contiguous chunk, the chunks then all-gathered in rank order."""
    comm = comm if comm is not None else world()
    mine = clean_chunk(np.asarray(raw, dtype=np.float64), cleaning, comm.size, comm.rank)
    parts = comm.allgather(torch.from_numpy(np.ascontiguousarray(mine)))
    return torch.cat(parts).numpy()


# -- windows, split and scaling ------------------------------------------------------------------------------------


def make_windows(series: np.ndarray, window: int, horizon: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[n, window]`` (consecutive past days) and targets ``[n, horizon]`` (the days right after).

    >>> x, y = make_windows(np.arange(6.0), window=3, horizon=2)
    >>> x.tolist(), y.tolist()
    ([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], [[3.0, 4.0], [4.0, 5.0]])
    """
    if window < 1 or horizon < 1:
        raise ValueError(f"window and horizon must be at least 1, got window={window}, horizon={horizon}.")
    n = len(series) - window - horizon + 1
    if n < 2:
        raise ValueError(
            f"A series of {len(series)} days is too short for window={window} + horizon={horizon}: "
            f"it needs at least {window + horizon + 1} days."
        )
    views = np.lib.stride_tricks.sliding_window_view(np.asarray(series, dtype=np.float64), window + horizon)
    return views[:, :window].copy(), views[:, window:].copy()


def split_index(n: int, train_fraction: float = 0.8) -> int:
    """Number of leading (oldest) windows used for training; the rest, later in time, are the test part.

    >>> split_index(752)
    601
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}.")
    cut = int(n * train_fraction)
    if cut < 1 or cut >= n:
        raise ValueError(f"{n} windows cannot be split {train_fraction:.0%}/{1 - train_fraction:.0%} in time order.")
    return cut


def fit_scaler(values: np.ndarray, kind: ScalerKind, comm: Communicator | None = None) -> tuple[float, float]:
    """``(offset, scale)`` with ``(x - offset) / scale`` in [0, 1] (minmax) or [-1, 1] (maxabs) on ``values``.

    Each rank reduces one contiguous chunk; min and max combine exactly, so every rank count gives the
    statistics one process computes from all values.
    """
    comm = comm if comm is not None else world()
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    start, stop = chunk_bounds(len(flat), comm.size, comm.rank)
    chunk = flat[start:stop]
    low = torch.tensor([chunk.min() if len(chunk) else math.inf], dtype=torch.float64)
    high = torch.tensor([chunk.max() if len(chunk) else -math.inf], dtype=torch.float64)
    comm.allreduce_(low, "min")
    comm.allreduce_(high, "max")
    lo, hi = low.item(), high.item()
    if kind == "minmax":
        return lo, (hi - lo) or 1.0
    if kind == "maxabs":
        return 0.0, max(abs(lo), abs(hi)) or 1.0
    raise ValueError(f"Unknown scaler {kind!r}: choose 'minmax' or 'maxabs'.")


@dataclass(frozen=True)
class WindowTransform:
    """Model space <-> case counts.

    ``"level"`` (the study's): values scaled by the fitted scaler. ``"logratio"`` (scale-free): each window is
    expressed relative to its last day, ``log1p(x) - log1p(x_last)``, then scaled; a model trained on one range
    of case counts can then forecast a wave far above it, because growth rates carry over and levels do not.
    """

    kind: Kind
    offset: float
    scale: float

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return (self._relative(x, x) - self.offset) / self.scale

    def targets(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return (self._relative(y, x) - self.offset) / self.scale

    def _relative(self, values: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.kind == "level":
            return values
        return np.log1p(values) - np.log1p(x[:, -1:])

    def inverse(self, z: Tensor, last: Tensor) -> Tensor:
        """Case counts from model outputs ``z`` ``[batch, horizon]`` and the windows' last days ``[batch, 1]``."""
        relative = z * self.scale + self.offset
        if self.kind == "level":
            return relative
        return torch.expm1(relative + torch.log1p(last))


def fit_transform(
    x_train: np.ndarray, y_train: np.ndarray, kind: Kind, scaler: ScalerKind, comm: Communicator | None = None
) -> WindowTransform:
    """A :class:`WindowTransform` whose scaler sees the training windows and targets only."""
    if kind not in ("level", "logratio"):
        raise ValueError(f"Unknown transform {kind!r}: choose 'level' or 'logratio'.")
    probe = WindowTransform(kind, 0.0, 1.0)
    seen = np.concatenate([probe.inputs(x_train).reshape(-1), probe.targets(y_train, x_train).reshape(-1)])
    return WindowTransform(kind, *fit_scaler(seen, scaler, comm))


# -- baselines ------------------------------------------------------------------------------------------------------


def persistence(x: np.ndarray, horizon: int) -> np.ndarray:
    """Forecast every future day as the last observed day (tomorrow = today)."""
    return np.repeat(x[:, -1:], horizon, axis=1)


def seasonal_naive(x: np.ndarray, horizon: int, period: int = 7) -> np.ndarray:
    """Forecast day ``t + k`` as the observed day ``period`` days earlier (repeating the last week).

    >>> seasonal_naive(np.arange(10.0)[None], horizon=3).tolist()
    [[3.0, 4.0, 5.0]]
    """
    if x.shape[1] < period:
        raise ValueError(f"A seasonal naive forecast of period {period} needs windows of at least {period} days.")
    return x[:, x.shape[1] - period + (np.arange(horizon) % period)]


def errors(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """RMSE and MAE of a forecast in case counts (torchmetrics, in float64).

    >>> errors(np.array([[1.0], [3.0]]), np.array([[2.0], [2.0]]))
    {'rmse': 1.0, 'mae': 1.0}
    """
    from torchmetrics.functional import mean_absolute_error, mean_squared_error

    p, t = (
        torch.as_tensor(np.asarray(prediction), dtype=torch.float64),
        torch.as_tensor(np.asarray(target), dtype=torch.float64),
    )
    return {"rmse": float(mean_squared_error(p, t, squared=False)), "mae": float(mean_absolute_error(p, t))}


# -- LightningDataModule -----------------------------------------------------------------------------------------------


class ForecastDataModule(LightningDataModule):
    """Windows of a daily series for next-days forecasting, prepared identically on every rank.

    Args:
        source: ``"sir"`` (synthetic, :func:`sir_series`), ``"nyt"`` (:func:`load_nyt_state`) or ``"csv"``
            (:func:`load_date_value`, a daily ``date,value`` file: set ``cumulative=False`` unless cumulative).
        path, state: file and state for ``"nyt"``/``"csv"``.
        days: use the first ``days`` days (``None``: all).
        window, horizon: past days seen, future days forecast.
        train_fraction: oldest share of the windows used for training (the rest is the test period).
        transform, scaler: see :class:`WindowTransform` and :func:`fit_scaler`.
        cumulative, active_days, outlier_factor: see :class:`Cleaning`.
        batch_size: training batch size (evaluation uses whole shards in batches of the same size).
        seed: seed of the synthetic series.

    :meth:`prepare` (called by :meth:`setup`, or directly to fail early on bad input) loads, cleans, windows and
    scales; it is a collective under MPI (all ranks call it). Batches are ``(inputs [b, window, 1], targets
    [b, horizon], last_day [b, 1], raw_targets [b, horizon])``: the last two give forecasts in case counts.
    """

    def __init__(
        self,
        source: str = "sir",
        path: str | None = None,
        state: str = "Tennessee",
        days: int | None = 766,
        window: int = 14,
        horizon: int = 1,
        train_fraction: float = 0.8,
        transform: Kind = "logratio",
        scaler: ScalerKind = "maxabs",
        cumulative: bool = True,
        active_days: int = 14,
        outlier_factor: float | None = None,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source, self.path, self.state, self.days, self.seed = source, path, state, days, seed
        self.window, self.horizon, self.train_fraction = window, horizon, train_fraction
        self.transform_kind, self.scaler_kind, self.batch_size = transform, scaler, batch_size
        self.cleaning = Cleaning(cumulative, active_days, outlier_factor)
        self.series: np.ndarray | None = None

    def load_raw(self) -> np.ndarray:
        if self.source == "sir":
            return sir_series(self.days or 766, self.seed)
        if self.path is None:
            raise ValueError(f"data.source={self.source!r} needs data.path (a CSV file).")
        if self.source == "nyt":
            return load_nyt_state(self.path, self.state, self.days)
        if self.source == "csv":
            return load_date_value(self.path, self.days)
        raise ValueError(f"Unknown data source {self.source!r}: choose 'sir', 'nyt' or 'csv'.")

    def prepare(self, comm: Communicator | None = None) -> None:
        """Load, clean, window, split and scale (collective under MPI); raises on bad input, before training."""
        if self.series is not None:
            return
        raw = self.load_raw()
        if not np.all(np.isfinite(raw)):
            raise ValueError("The series holds NaN or infinite values after loading.")
        self.series = clean_parallel(raw, self.cleaning, comm)
        self.x, self.y = make_windows(self.series, self.window, self.horizon)
        self.split = split_index(len(self.x), self.train_fraction)
        self.transform = fit_transform(
            self.x[: self.split], self.y[: self.split], self.transform_kind, self.scaler_kind, comm
        )

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def _dataset(self, part: slice) -> TensorDataset:
        x, y = self.x[part], self.y[part]
        as_tensor = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)
        return TensorDataset(
            as_tensor(self.transform.inputs(x))[..., None],
            as_tensor(self.transform.targets(y, x)),
            as_tensor(x[:, -1:]),
            as_tensor(y),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(slice(0, self.split)), batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset(slice(self.split, None)), batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def test_windows(self) -> tuple[np.ndarray, np.ndarray]:
        """Raw inputs and targets of the test period, in time order."""
        return self.x[self.split :], self.y[self.split :]

    def baselines(self) -> dict[str, dict[str, float]]:
        """RMSE and MAE of persistence and 7-day seasonal naive on the test targets, in case counts."""
        x, y = self.test_windows()
        out = {}
        for name, forecast in (
            ("persistence", persistence(x, self.horizon)),
            ("seasonal7", seasonal_naive(x, self.horizon)),
        ):
            out[name] = errors(forecast, y)
        return out
