"""PNG charts for incident reports (matplotlib, Agg backend: no display needed).

Every chart has UTC on its time axis with the country's local time named in the axis label,
incidents shaded by kind and the restorations inside them left unshaded. Series come in as
pandas Series indexed by tz-aware UTC timestamps. Long series are thinned for drawing: each
bucket's median as the line, its minimum..maximum as a light band around it, so a collapse
shorter than a bucket is never smoothed away.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

KIND_COLOURS: Final = {
    "nationwide_shutdown": "#d62728",
    "network_outage": "#ff7f0e",
    "service_block": "#9467bd",
    "throttling": "#bcbd22",
    "vantage_offline": "#7f7f7f",
}
KIND_WORDS: Final = {
    "nationwide_shutdown": "nationwide shutdown",
    "network_outage": "network outage",
    "service_block": "service block",
    "throttling": "throttling",
    "vantage_offline": "monitor offline",
}
LINE: Final = "#1f4e79"
BASELINE: Final = "#444444"
BAND: Final = "#9aa5b1"  # neutral grey-blue: stays readable under the incidents' colours
DPI: Final = 130
MAX_DRAWN_POINTS: Final = 2000


@dataclass(frozen=True, slots=True)
class Span:
    """A shaded period: an incident (kind) with the restorations inside it."""

    kind: str
    start: datetime
    end: datetime
    restorations: tuple[tuple[datetime, datetime], ...] = ()


@dataclass(frozen=True, slots=True)
class Thinned:
    """A series cut to about `max_points` buckets: each bucket's median for the line, and its
    minimum and maximum for a light band, so a collapse shorter than a bucket stays visible."""

    line: pd.Series
    low: pd.Series
    high: pd.Series

    @property
    def thinned(self) -> bool:
        return not self.low.equals(self.line)


def thin(series: pd.Series, max_points: int = MAX_DRAWN_POINTS) -> Thinned:
    series = series.dropna()
    if len(series) <= max_points:
        return Thinned(series, series, series)
    span = series.index[-1] - series.index[0]
    bucket = max(span / max_points, pd.Timedelta(seconds=1)).ceil("s")
    grouped = series.resample(bucket)
    return Thinned(grouped.median().dropna(), grouped.min().dropna(), grouped.max().dropna())


def _draw(ax: Axes, drawn: Thinned, lw: float, label: str | None = None) -> None:
    if drawn.thinned:
        ax.fill_between(drawn.low.index, drawn.low.to_numpy(), drawn.high.to_numpy(),
                        color=LINE, alpha=0.18, lw=0, zorder=1.5)
    ax.plot(drawn.line.index, drawn.line.to_numpy(), color=LINE, lw=lw, label=label, zorder=2)


def _percent(value: float, _pos: int) -> str:
    return f"{value * 100:.0f}%"


def _time_axis(ax: Axes, start: datetime, end: datetime, label: str | None) -> None:
    locator = mdates.AutoDateLocator(tz=UTC, minticks=4, maxticks=9)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=UTC)  # type: ignore[no-untyped-call]
    formatter.offset_formats = ["", "%Y", "%b %Y", "%d %b %Y", "%d %b %Y", "%d %b %Y %H:%M"]
    ax.xaxis.set_major_formatter(formatter)
    ax.set_xlim(start, end)  # type: ignore[arg-type]
    if label:
        ax.set_xlabel(label, fontsize=9, color="#333333")


def _shade(ax: Axes, spans: Sequence[Span], start: datetime, end: datetime) -> set[str]:
    kinds = set()
    for span in spans:
        a, b = max(span.start, start), min(span.end, end)
        if a >= b:
            continue
        kinds.add(span.kind)
        colour = KIND_COLOURS.get(span.kind, "#8c564b")
        ax.axvspan(a, b, color=colour, alpha=0.13, lw=0, zorder=0)  # type: ignore[arg-type]
        for r0, r1 in span.restorations:
            ax.axvspan(max(r0, a), min(r1, b), color="white", alpha=0.85, lw=0,  # type: ignore[arg-type]
                       zorder=0.5)
    return kinds


def _legend_patches(kinds: set[str], restorations: bool) -> list[Any]:
    patches: list[Any] = [Patch(color=KIND_COLOURS.get(k, "#8c564b"), alpha=0.25,
                                label=KIND_WORDS.get(k, k).capitalize())
                          for k in KIND_COLOURS if k in kinds]
    if restorations:
        patches.append(Patch(facecolor="white", edgecolor="#bbbbbb", label="Restoration"))
    return patches


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def level_chart(path: Path, level: pd.Series, spans: Sequence[Span], *, title: str,
                time_label: str, start: datetime, end: datetime, warning: float,
                critical: float) -> Path:
    """The level (value over baseline) with 100% = ordinary, the band the detector tolerates,
    and the warning/critical thresholds."""
    fig, ax = plt.subplots(figsize=(11, 4.2), layout="constrained")
    drawn = thin(level)
    top = max(1.3, min(2.0, float(drawn.line.max()) * 1.08 if len(drawn.line) else 1.3))
    ax.axhspan(warning, 2 - warning, color=BAND, alpha=0.18, lw=0,
               label=f"Ordinary range (baseline ±{(1 - warning) * 100:.0f}%)")
    ax.axhline(1.0, color=BASELINE, lw=1.0, ls="--", label="Baseline (ordinary level)")
    ax.axhline(critical, color=KIND_COLOURS["nationwide_shutdown"], lw=0.8, ls=":",
               label=f"Critical threshold ({critical * 100:.0f}%)")
    kinds = _shade(ax, spans, start, end)
    _draw(ax, drawn, 1.6, "Level")
    ax.set_ylim(0, top)
    ax.yaxis.set_major_formatter(FuncFormatter(_percent))
    ax.set_ylabel("% of ordinary level")
    _frame(ax, spans, kinds, start=start, end=end, time_label=time_label, title=title,
           title_size=12, legend_y=-0.2, legend_columns=4)
    return _save(fig, path)


def _frame(ax: Axes, spans: Sequence[Span], kinds: set[str], *, start: datetime, end: datetime,
           time_label: str, title: str, title_size: int, legend_y: float,
           legend_columns: int) -> None:
    """What every full-width chart has: UTC time axis, title, grid, legend below the plot."""
    _time_axis(ax, start, end, time_label)
    ax.set_title(title, loc="left", fontsize=title_size, fontweight="bold")
    ax.grid(True, axis="y", color="#dddddd", lw=0.6)
    handles, _ = ax.get_legend_handles_labels()
    handles += _legend_patches(kinds, any(s.restorations for s in spans))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, legend_y),
              ncol=legend_columns, fontsize=8, frameon=False)


def signal_chart(path: Path, value: pd.Series, baseline: pd.Series, spans: Sequence[Span], *,
                 title: str, ylabel: str, time_label: str, start: datetime, end: datetime,
                 band: float, as_percent: bool) -> Path:
    """One signal in its own unit against the detector's baseline and the band around it."""
    fig, ax = plt.subplots(figsize=(11, 3.6), layout="constrained")
    base = thin(baseline).line
    drawn = thin(value)
    ax.fill_between(base.index, base.to_numpy() * band, base.to_numpy() * (2 - band),
                    color=BAND, alpha=0.18, lw=0,
                    label=f"Baseline ±{(1 - band) * 100:.0f}%")
    ax.plot(base.index, base.to_numpy(), color=BASELINE, lw=1.0, ls="--",
            label="Baseline (expected for the time of day)")
    kinds = _shade(ax, spans, start, end)
    _draw(ax, drawn, 1.4, "Measured")
    peak = max(float(drawn.line.max()) if len(drawn.line) else 0.0,
               float(base.max()) * (2 - band) if len(base) else 0.0)
    ax.set_ylim(0, peak * 1.05 if peak > 0 else 1)
    if as_percent:
        ax.yaxis.set_major_formatter(FuncFormatter(_percent))
    ax.set_ylabel(ylabel)
    _frame(ax, spans, kinds, start=start, end=end, time_label=time_label, title=title,
           title_size=11, legend_y=-0.24, legend_columns=5)
    return _save(fig, path)


def small_multiples(path: Path, levels: Mapping[str, pd.Series],
                    spans: Mapping[str, Sequence[Span]], *, title: str, time_label: str,
                    start: datetime, end: datetime, critical: float, columns: int = 6) -> Path:
    """One small level chart per network or region, in the order given, sharing both axes."""
    names = list(levels)
    columns = max(1, min(columns, len(names)))
    rows = max(1, math.ceil(len(names) / columns))
    height = 1.35 * rows + 1.0
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, height), sharex=True,
                             sharey=True, squeeze=False)
    # fixed margins in inches: constrained layout costs seconds with dozens of axes
    fig.subplots_adjust(left=0.45 / (2.1 * columns), right=1 - 0.1 / (2.1 * columns),
                        top=1 - 0.55 / height, bottom=0.55 / height, hspace=0.42, wspace=0.16)
    locator = mdates.AutoDateLocator(tz=UTC, minticks=2, maxticks=4)  # type: ignore[no-untyped-call]
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        name = names[k]
        drawn = thin(levels[name], 400)
        _shade(ax, spans.get(name, ()), start, end)
        ax.axhline(1.0, color=BASELINE, lw=0.6, ls="--")
        ax.axhline(critical, color=KIND_COLOURS["nationwide_shutdown"], lw=0.5, ls=":")
        _draw(ax, drawn, 0.9)
        ax.set_title(name if len(name) <= 24 else name[:23] + "…", fontsize=7.5, pad=2)
        ax.set_ylim(0, 1.3)
        ax.set_xlim(start, end)
        ax.yaxis.set_major_locator(MaxNLocator(3))
        ax.yaxis.set_major_formatter(FuncFormatter(_percent))
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(
            mdates.DateFormatter("%d %b", tz=UTC))  # type: ignore[no-untyped-call]
        ax.tick_params(labelsize=6.5, length=2)
        ax.grid(True, axis="y", color="#eeeeee", lw=0.5)
    fig.suptitle(title, x=0.01, y=1 - 0.12 / height, ha="left", va="top", fontsize=11,
                 fontweight="bold")
    fig.supxlabel(time_label, y=0.08 / height, va="bottom", fontsize=8, color="#333333")
    return _save(fig, path)
