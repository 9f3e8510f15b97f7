"""PNG plots of evaluation results and training logs (needs the `plot` extra: matplotlib).

matplotlib is imported when a plot is drawn, never with this module; figures are drawn
on an Agg canvas of their own, so pyplot's global state and backend are left alone.

Training logs are JSON lines, one object per line. Lines with `"event": "train"` hold
`step`, `loss` (and `lr`); lines with `"event": "eval"` hold `step` and
`domains: {name: {"loss": x, ...}}`; lines of other events are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecompose.errors import DataError, Location
from moecompose.training.evaluate import PARTS, EvalResult


def _canvas() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or the DataError that says how to get them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise DataError("plotting needs matplotlib", hint="pip install 'moecompose[plot]'") from error
    return Figure, FigureCanvasAgg


def _save(figure: Any, canvas: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas(figure).print_png(path)
    return path


def plot_usage(result: EvalResult, path: Path) -> Path:
    """A heatmap per domain, side by side: rows the routed layers (and parts), columns
    the experts, colour the share (one scale for all domains; blank where a layer has
    fewer experts). Writes a PNG to `path` and returns it."""
    rows = sorted(
        {(u.layer, u.part, u.kind) for d in result.domains.values() for u in d.usage},
        key=lambda r: (r[0], PARTS.index(r[1])),
    )
    if not rows:
        raise DataError(f"no expert usage to plot: {result.artifact or 'the model'} has no routed layer")
    Figure, Canvas = _canvas()
    experts = max(len(u.share) for d in result.domains.values() for u in d.usage)
    grids = {}
    for name, d in result.domains.items():
        grid = [[math.nan] * experts for _ in rows]
        for u in d.usage:
            grid[rows.index((u.layer, u.part, u.kind))][: len(u.share)] = u.share
        grids[name] = grid
    top = max(v for g in grids.values() for row in g for v in row if not math.isnan(v))
    count = len(grids)
    size = (1.2 + (0.5 * experts + 1.6) * count, 1.2 + 0.3 * len(rows))
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    image = None
    for ax, (name, grid) in zip(axes, grids.items()):
        image = ax.imshow(grid, vmin=0.0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(len(rows)), [f"{layer} {part}" for layer, part, _ in rows])
        if len(rows) * experts <= 256:
            for i, row in enumerate(grid):
                for e, value in enumerate(row):
                    if not math.isnan(value):
                        ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if value > 0.6 * top else "white")
    figure.colorbar(image, ax=list(axes), label="share")
    figure.suptitle(f"expert usage {result.artifact}".strip())
    return _save(figure, Canvas, path)


@dataclass
class TrainingLog:
    """The losses of one JSON-lines training log: train (step, loss) pairs and, per
    domain, eval (step, loss) pairs."""

    path: Path
    train: list[tuple[float, float]] = field(default_factory=list)
    eval: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_log(path: Path) -> TrainingLog:
    """Parse a training log; a line that is not a JSON object, or a train or eval line
    without its numbers, raises `DataError` at file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read training log: {error}", location=Location(str(path))) from error
    log = TrainingLog(path)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise _malformed(path, number, f"not JSON ({error.msg})") from error
        problem = _read_entry(entry, log)
        if problem is not None:
            raise _malformed(path, number, problem)
    return log


def _malformed(path: Path, line: int, why: str) -> DataError:
    return DataError(f"malformed training log line: {why}", location=Location(str(path), line))


def _read_entry(entry: Any, log: TrainingLog) -> str | None:
    """Add a parsed line's losses to `log`; returns what is wrong with it, if anything."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    event = entry.get("event")
    if event not in ("train", "eval"):
        return None
    step = entry.get("step")
    if not _number(step):
        return f"{event} line without a numeric 'step'"
    if event == "train":
        if not _number(entry.get("loss")):
            return "train line without a numeric 'loss'"
        log.train.append((step, entry["loss"]))
        return None
    domains = entry.get("domains")
    if not isinstance(domains, dict):
        return "eval line without a 'domains' object"
    for name, values in domains.items():
        if not (isinstance(values, dict) and _number(values.get("loss"))):
            return f"eval line: domain {name!r} without a numeric 'loss'"
    for name, values in domains.items():
        log.eval.setdefault(name, []).append((step, values["loss"]))
    return None


def plot_curves(logs: Sequence[Path], path: Path) -> Path:
    """Loss against step from training logs: one panel for the train loss and one per
    evaluated domain, a line per log file. Writes a PNG to `path` and returns it."""
    read = [read_log(p) for p in logs]
    domains = list(dict.fromkeys(name for log in read for name in log.eval))
    if not any(log.train for log in read) and not domains:
        shown = ", ".join(str(p) for p in logs) or "no log given"
        raise DataError(f"nothing to plot: no train or eval lines in {shown}")
    Figure, Canvas = _canvas()
    names = [log.path.stem for log in read]
    names = [n if names.count(n) == 1 else str(log.path) for n, log in zip(names, read)]
    panels = [("train", [log.train for log in read])]
    panels += [(f"eval: {d}", [log.eval.get(d, []) for log in read]) for d in domains]
    figure = Figure(figsize=(6.4, 2.6 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels):
        for name, points in zip(names, series):
            if points:
                steps, losses = zip(*sorted(points, key=lambda p: p[0]))
                ax.plot(steps, losses, label=name, marker="o" if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    return _save(figure, Canvas, path)
