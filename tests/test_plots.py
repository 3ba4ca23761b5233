"""Figures a paper can use: heatmap panels whose labels never overlap a neighbour."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from jbyz import plots  # noqa: E402


def _table(aggs=("mean", "median", "krum", "trimmed_mean")):
    rows = []
    rng = np.random.default_rng(0)
    for a in aggs:
        for f in (0, 1, 2, 3):
            for lr in (0.001, 0.01, 0.1, 1.0):
                for seed in (1, 2):
                    rid = f"{a}-{f}-{lr}-{seed}"
                    for step in (0, 10):
                        rows.append(dict(run_id=rid, aggregator=a, f_real=f, lr=lr, seed=seed,
                                         step=step, test_accuracy=float(rng.uniform())))
    return pd.DataFrame(rows)


def _boxes(fig, ax):
    r = fig.canvas.get_renderer()
    return ax.get_tightbbox(r)


def test_heatmap_panels_do_not_overlap(tmp_path):
    fig = plots.heatmap(_table(), x="lr", y="f_real", col="aggregator", title="a title",
                        path=tmp_path / "h.png")
    fig.canvas.draw()
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"][:4]
    assert len(axes) == 4
    boxes = [_boxes(fig, a) for a in axes]
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0 + 0.5, (left, right)   # labels of one panel stop before the next
    # the y axis is shared: its label is written once, on the first panel
    assert [a.get_ylabel() for a in axes] == ["f_real", "", "", ""]
    # the title sits above every panel title
    top = max(b.y1 for b in boxes)
    assert fig._suptitle.get_window_extent(fig.canvas.get_renderer()).y0 >= top - 0.5
