"""The standard figures, drawn from a results table (:func:`jbyz.results.load_results`).

* :func:`accuracy_curves`: test accuracy against steps, one line per ``hue`` value (mean over
  seeds with a min-max band), one panel per ``col`` value.
* :func:`final_accuracy_bars`: final (or best) accuracy per configuration, grouped.
* :func:`heatmap`: a per-run statistic (best / final accuracy) over two axes (for example batch
  size x Byzantine fraction), mean over seeds and the other axes, one panel per ``col`` value.
* :func:`paired`: paired comparison of two values of one field (for example worker vs server
  momentum): each point is one configuration and seed, x = the first value, y = the second.
* :func:`selection_heatmaps` and :func:`best_rule_map`: ByzFL's benchmark figures from a
  :func:`jbyz.results.select_hyperparameters` table: per rule, the test accuracy at its chosen
  hyper-parameters over (Byzantine workers x data heterogeneity); the best rule of each cell.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _mpl():
    """``matplotlib.pyplot``, with whatever backend the session has: the library never changes it
    (a Jupyter session keeps inline figures; ``jbyz`` on the command line picks Agg itself)."""
    import matplotlib.pyplot as plt

    return plt


def component_labels(df: pd.DataFrame, column: str) -> pd.Series:
    """The values of ``column`` as figures show them: an attack with a resolved strength carries
    it, e.g. ``alie (z = 1.5)`` from the ``attack.z`` column (the z the run used, even when its
    configuration left it to the default or to Baruch et al.'s formula)."""
    values = df[column].astype(str)
    if column == "attack" and "attack.z" in df:
        z = pd.to_numeric(df["attack.z"], errors="coerce")
        values = values.where(z.isna(), values + " (z = " + z.map("{:g}".format) + ")")
    return values


def _labelled(df: pd.DataFrame, *columns) -> pd.DataFrame:
    cols = [c for c in columns if c is not None and c in df]
    return df.assign(**{c: component_labels(df, c) for c in cols}) if cols else df


def accuracy_curves(
    df: pd.DataFrame,
    *,
    hue: str = "aggregator",
    col: str | None = "attack",
    metric: str = "test_accuracy",
    path: str | Path | None = None,
    title: str | None = None,
    style: str | None = None,
):
    """Plots ``metric`` against ``step``: one line per ``hue`` value, one panel per ``col`` value.

    Lines are means over the rows sharing (hue, col, step) (seeds and any other axes); the shaded
    band spans their min and max. With ``style`` (a second field, e.g. ``momentum_at``), each
    of its values gets its own line style, in the colour of its ``hue``. Returns the matplotlib
    figure; writes it to ``path`` if given.
    """
    plt = _mpl()
    df = _labelled(df, hue, col)
    cols = [None] if col is None or col not in df else list(dict.fromkeys(df[col]))
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.9), sharey=True,
                             squeeze=False, layout="constrained")
    hues = list(dict.fromkeys(df[hue])) if hue in df else [None]
    styles = (list(dict.fromkeys(df[style].astype(str))) if style is not None and style in df
              else [None])
    dashes = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10" if len(hues) <= 10 else "tab20")
    for ax, c in zip(axes[0], cols):
        sub = df if c is None else df[df[col] == c]
        for i, h in enumerate(hues):
            of_hue = sub if h is None else sub[sub[hue] == h]
            for j, st in enumerate(styles):
                s = of_hue if st is None else of_hue[of_hue[style].astype(str) == st]
                if s.empty:
                    continue
                g = s.groupby("step")[metric].agg(["mean", "min", "max"]).reset_index()
                label = str(h) if st is None else f"{h}, {style} = {st}"
                ax.plot(g["step"], g["mean"], label=label, color=cmap(i), lw=1.6,
                        ls=dashes[j % len(dashes)])
                ax.fill_between(g["step"], g["min"], g["max"], color=cmap(i), alpha=0.15, lw=0)
        ax.set_xlabel("step")
        ax.set_title(f"{col} = {c}" if c is not None else (title or ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric.replace("_", " "))
    # below the panels, where it hides no curve
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a label missing from the first panel
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in labels:
                handles.append(hd)
                labels.append(lb)
    fig.legend(handles, labels, title=hue, fontsize=8, title_fontsize=9,
               loc="outside lower center", ncol=min(len(labels), 3 if len(styles) > 1 else 6))
    if title and cols != [None]:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def final_accuracy_bars(
    summary: pd.DataFrame,
    *,
    x: str = "aggregator",
    hue: str = "attack",
    value: str = "final_mean",
    err: str | None = "final_std",
    path: str | Path | None = None,
):
    """Grouped bars of a :func:`jbyz.results.summarize` table (e.g. final accuracy per rule/attack)."""
    plt = _mpl()
    summary = _labelled(summary, x, hue)
    xs = list(dict.fromkeys(summary[x]))
    hs = list(dict.fromkeys(summary[hue])) if hue in summary else [None]
    width = 0.8 / len(hs)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(xs) * max(1, len(hs)) ** 0.5), 3.4))
    for j, h in enumerate(hs):
        s = summary if h is None else summary[summary[hue] == h]
        s = s.set_index(x).reindex(xs)
        pos = [i + (j - (len(hs) - 1) / 2) * width for i in range(len(xs))]
        yerr = s[err].fillna(0).to_numpy() if err and err in s else None
        ax.bar(pos, s[value].to_numpy(), width, yerr=yerr, label=str(h), capsize=2)
    ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right")
    ax.set_ylabel(value.replace("_", " "))
    ax.grid(axis="y", alpha=0.3)
    if hs != [None]:
        ax.legend(title=hue, fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def per_run(df: pd.DataFrame, metric: str = "test_accuracy") -> pd.DataFrame:
    """One row per run: its config columns plus ``best`` (max over evaluations) and ``final``."""
    key = "run_id" if "run_id" in df else None
    if key is None:
        raise ValueError("per_run needs a results table with a run_id column")
    df = df.sort_values("step")
    stats = df.groupby(key)[metric].agg(best="max", final="last")
    first = df.groupby(key).first()
    return first.join(stats).reset_index()


def heatmap(
    df: pd.DataFrame,
    *,
    x: str,
    y: str,
    stat: str = "best",
    metric: str = "test_accuracy",
    col: str | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    fmt: str = "{:.2f}",
):
    """A heatmap of a per-run statistic over two config axes (mean over seeds and other axes).

    Args:
      df: a results table.
      x, y: the two config columns (for example ``batch_size`` and ``f_real``).
      stat: ``"best"`` (highest observed ``metric`` of a run) or ``"final"``.
      col: one panel per value of this column (optional).
    Returns the figure (and writes it to ``path``).
    """
    plt = _mpl()
    runs = _labelled(per_run(df, metric), col)
    cols = [None] if col is None else sorted(runs[col].dropna().unique(), key=str)
    xs = sorted(runs[x].dropna().unique())
    ys = sorted(runs[y].dropna().unique())
    # Shared y axis (labels on the first panel only) and constrained layout: tick labels, titles
    # and the colour bar never overlap a neighbouring panel.
    fig, axes = plt.subplots(1, len(cols), figsize=(0.9 * len(xs) * len(cols) + 2.2, 0.55 * len(ys) + 1.8),
                             squeeze=False, sharey=True, layout="constrained")
    vmin, vmax = runs[stat].min(), runs[stat].max()
    for ax, c in zip(axes[0], cols):
        sub = runs if c is None else runs[runs[col] == c]
        grid = sub.pivot_table(index=y, columns=x, values=stat, aggfunc="mean").reindex(index=ys, columns=xs)
        im = ax.imshow(grid.to_numpy(float), origin="lower", aspect="auto", cmap="viridis",
                       vmin=vmin, vmax=vmax)
        for i in range(len(ys)):
            for j in range(len(xs)):
                v = grid.iat[i, j]
                if pd.notna(v):
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="white" if v < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=45)
        ax.set_yticks(range(len(ys)), [str(v) for v in ys])
        ax.set_xlabel(x)
        if ax is axes[0][0]:
            ax.set_ylabel(y)
        ax.set_title(f"{col} = {c}" if c is not None else (title or ""), fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label=f"{stat} {metric.replace('_', ' ')}")
    if title and cols != [None]:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


def paired(
    df: pd.DataFrame,
    *,
    field: str,
    a,
    b,
    stat: str = "best",
    metric: str = "test_accuracy",
    hue: str | None = "aggregator",
    path: str | Path | None = None,
    title: str | None = None,
):
    """Paired comparison of ``field = a`` vs ``field = b`` (e.g. momentum_at server vs worker).

    Runs are paired when every other config field (seed included) is equal. Each pair is a point
    (x: the ``a`` run's statistic, y: the ``b`` run's); points above the diagonal favour ``b``.
    Returns ``(figure, pairs)`` where ``pairs`` is a DataFrame with columns ``a``, ``b``, ``gain``.
    """
    from jbyz.config import FIELDS

    plt = _mpl()
    runs = per_run(df, metric)
    keys = [c for c in runs.columns if c in FIELDS and c != field]
    A = runs[runs[field].astype(str) == str(a)].set_index(keys)[stat].rename("a")
    B = runs[runs[field].astype(str) == str(b)].set_index(keys)[stat].rename("b")
    pairs = pd.concat([A, B], axis=1, join="inner").reset_index()
    pairs["gain"] = pairs["b"] - pairs["a"]
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    hues = list(dict.fromkeys(pairs[hue])) if hue in pairs else [None]
    cmap = plt.get_cmap("tab10")
    for i, h in enumerate(hues):
        s = pairs if h is None else pairs[pairs[hue] == h]
        ax.scatter(s["a"], s["b"], s=14, alpha=0.75, color=cmap(i % 10), label=str(h))
    lo = min(pairs["a"].min(), pairs["b"].min()) if len(pairs) else 0
    hi = max(pairs["a"].max(), pairs["b"].max()) if len(pairs) else 1
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"{stat} {metric.replace('_', ' ')}, {field} = {a}")
    ax.set_ylabel(f"{stat} {metric.replace('_', ' ')}, {field} = {b}")
    better = (pairs["gain"] > 0).mean() if len(pairs) else float("nan")
    ax.set_title(title or f"{len(pairs)} pairs; {field} = {b} better in {better:.0%}", fontsize=10)
    ax.grid(alpha=0.3)
    if hues != [None]:
        ax.legend(title=hue, fontsize=7, title_fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig, pairs


# Readable axis labels of the benchmark figures.
AXIS_LABELS = {
    "f_real": "Byzantine workers (f_real)",
    "f": "declared f",
    "heterogeneity": "data heterogeneity",
    "dirichlet_alpha": "Dirichlet alpha",
    "gamma": "gamma",
    "shards_per_worker": "shards per worker",
}


def _axis_label(column: str | None) -> str:
    return "" if column is None else AXIS_LABELS.get(column, column.replace("_", " "))


def _value_label(value: str) -> str:
    """``test_accuracy_worst`` -> ``test accuracy (worst attack)``."""
    if value.endswith("_worst"):
        return f"{value[:-len('_worst')].replace('_', ' ')} (worst attack)"
    return value.replace("_", " ")


def _levels(values: pd.Series) -> list:
    """An axis' values in order: a categorical's own order, numbers ascending, else as text."""
    present = values.dropna()
    if isinstance(values.dtype, pd.CategoricalDtype):
        seen = set(present)
        return [c for c in values.cat.categories if c in seen]
    uniq = list(present.unique())
    if pd.api.types.is_numeric_dtype(present):
        return sorted(uniq)
    return sorted(uniq, key=str)


def _tick(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cell_grid(d: pd.DataFrame, x: str, y: str | None, value: str, xs: list, ys: list):
    import numpy as np

    grid = np.full((len(ys), len(xs)), np.nan)
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    for _, r in d.iterrows():
        j = xi.get(r[x])
        i = yi.get(r[y]) if y is not None else 0
        if i is not None and j is not None and pd.notna(r[value]):
            grid[i, j] = r[value]
    return grid


def selection_heatmaps(
    selection: pd.DataFrame,
    *,
    value: str | None = None,
    x: str = "f_real",
    y: str | None = None,
    rule: str | list[str] | None = None,
    ncols: int = 4,
    path: str | Path | None = None,
    title: str | None = None,
    fmt: str = "{:.2f}",
    cmap: str = "viridis",
):
    """One heatmap per method of a :func:`jbyz.results.select_hyperparameters` table: the test
    accuracy at its chosen hyper-parameters (worst case over attacks) over the setting cells.

    As ByzFL's benchmark heatmaps: ``x`` is the number of Byzantine workers, ``y`` the data
    heterogeneity (bottom: the most homogeneous). Panels share their axes and one colour scale;
    empty cells (a setting a method was not run in) stay blank.

    Args:
      selection: the table (one row per method and cell).
      value: the column shown (default ``<report>_worst``).
      x, y: the cell's columns (default ``f_real`` and the selection's heterogeneity column;
        without one, a single row).
      rule: the columns naming a method, one panel each (default: the selection's ``by``
        without ``x`` and ``y``).
      ncols: panels per row.
    Returns the figure (and writes it to ``path``).
    """
    from jbyz.results import _selection_axes, rule_labels

    plt = _mpl()
    value, x, y, rules = _selection_axes(selection, value, x, y, rule)
    d = selection.assign(_rule=rule_labels(selection, rules))
    panels = sorted(d["_rule"].unique(), key=str)
    xs = _levels(d[x])
    ys = _levels(d[y]) if y is not None else [None]
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    longest = max((len(_tick(v)) for v in ys if v is not None), default=0)
    fig, axes = plt.subplots(
        nrows, ncols, squeeze=False, sharex=True, sharey=True, layout="constrained",
        figsize=(ncols * (0.62 * len(xs) + 0.9) + 0.07 * longest + 1.6,
                 nrows * (0.42 * len(ys) + 0.9) + 0.6))
    vals = d[value].astype(float)
    vmin, vmax = float(vals.min()), float(vals.max())
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        name = panels[k]
        grid = _cell_grid(d[d["_rule"] == name], x, y, value, xs, ys)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        for i in range(len(ys)):
            for j in range(len(xs)):
                v = grid[i, j]
                if v == v:
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="white" if v < (vmin + vmax) / 2 else "black")
        ax.set_xticks(range(len(xs)), [_tick(v) for v in xs])
        ax.set_yticks(range(len(ys)), [_tick(v) if v is not None else "" for v in ys])
        ax.tick_params(labelsize=8)
        ax.set_title(str(name), fontsize=10)
        if k // ncols == nrows - 1 or k + ncols >= len(panels):
            ax.set_xlabel(_axis_label(x))
            ax.xaxis.set_tick_params(labelbottom=True)
        if k % ncols == 0:
            ax.set_ylabel(_axis_label(y))
    fig.colorbar(im, ax=[a for a in axes.flat if a.get_visible()], shrink=0.9,
                 label=_value_label(value))
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


def best_rule_map(
    selection: pd.DataFrame,
    *,
    value: str | None = None,
    x: str = "f_real",
    y: str | None = None,
    rule: str | list[str] | None = None,
    tie_tol: float = 0.0,
    path: str | Path | None = None,
    title: str | None = None,
    fmt: str = "{:.2f}",
):
    """The best method of each setting cell (:func:`jbyz.results.best_rule_per_cell`): one
    colour per method, the value it reaches written in the cell (``+n``: n other methods tied
    within ``tie_tol``). ByzFL's aggregated heatmap shows the value only; here the colour says
    which rule reaches it. Arguments as :func:`selection_heatmaps`. Returns the figure (and
    writes it to ``path``).
    """
    import matplotlib.colors as mcolors
    import numpy as np
    from matplotlib.patches import Patch

    from jbyz.results import _selection_axes, best_rule_per_cell, rule_labels

    plt = _mpl()
    value, x, y, rules = _selection_axes(selection, value, x, y, rule)
    best = best_rule_per_cell(selection, value=value, x=x, y=y, rule=rules, tie_tol=tie_tol)
    every = sorted(rule_labels(selection, rules).unique(), key=str)  # colours fixed by all rules
    palette = plt.get_cmap("tab10" if len(every) <= 10 else "tab20")
    colour = {r: palette(i % palette.N) for i, r in enumerate(every)}
    xs = _levels(selection[x])
    ys = _levels(selection[y]) if y is not None else [None]
    longest = max((len(_tick(v)) for v in ys if v is not None), default=0)
    fig, ax = plt.subplots(figsize=(0.75 * len(xs) + 0.07 * longest + 3.2, 0.5 * len(ys) + 1.5),
                           layout="constrained")
    rgba = np.ones((len(ys), len(xs), 4))
    xi = {v: i for i, v in enumerate(xs)}
    yi = {v: i for i, v in enumerate(ys)}
    winners = []
    for _, r in best.iterrows():
        i, j = (yi[r[y]] if y is not None else 0), xi[r[x]]
        rgba[i, j] = colour[r["rule"]]
        c = mcolors.to_rgb(colour[r["rule"]])
        dark = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 0.55
        text = fmt.format(r[value])
        if r["tied"]:
            text += f"\n(+{len(r['tied'].split(', '))} tied)"
        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
        if r["rule"] not in winners:
            winners.append(r["rule"])
    ax.imshow(rgba, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), [_tick(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_tick(v) if v is not None else "" for v in ys])
    ax.tick_params(labelsize=8)
    ax.set_xlabel(_axis_label(x))
    ax.set_ylabel(_axis_label(y))
    ax.set_title(title or f"best rule per cell: {_value_label(value)}", fontsize=10)
    handles = [Patch(facecolor=colour[r], label=r) for r in sorted(winners, key=str)]
    fig.legend(handles=handles, title=" + ".join(rules), loc="outside right upper", fontsize=8,
               title_fontsize=9, frameon=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig
