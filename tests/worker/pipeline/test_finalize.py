"""pareto.png: every axis has tick labels a reader can tell apart, whatever the spread of the
candidates' sizes and latencies (narrow spreads once ran labels together: "0.00850.009")."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from worker.pipeline.finalize import pareto_figure


def _candidates(sizes: list[float], latencies: list[float]) -> list[dict]:
    return [
        {
            "key": f"s{i}",
            "metrics": {"size_bytes": s, "latency_ms": ms, "accuracy": 0.8 + 0.01 * i},
            "on_front": i % 2 == 0,
            "final": i == 0,
        }
        for i, (s, ms) in enumerate(zip(sizes, latencies, strict=True))
    ]


def _labels_in_view(ax, renderer) -> list[tuple[float, float, str]]:
    """(left, right, text) in pixels of each x tick label drawn inside the axis's range."""
    low, high = ax.get_xlim()
    return sorted(
        (box.x0, box.x1, t.get_text())
        for t in ax.get_xticklabels()
        if t.get_visible() and t.get_text() and low <= t.get_position()[0] <= high
        for box in [t.get_window_extent(renderer)]
    )


@pytest.mark.parametrize(
    "latencies",
    [
        [0.00707, 0.0075, 0.0082, 0.0085, 0.00896],  # a tenth of a decade: ran together
        [0.00121, 0.0015, 0.0019, 0.0022, 0.00250],  # under a decade, one 1-2-5 value
        [0.128, 0.15, 0.2, 0.3, 0.325],
        [0.0105, 0.04, 0.2, 1.0, 3.24],  # over two decades
    ],
)
def test_tick_labels_do_not_overlap(latencies):
    sizes = [1361.0, 2000.0, 3000.0, 5000.0, 6357.0]
    fig = pareto_figure(
        _candidates(sizes, latencies), {"accuracy": 0.95}, SimpleNamespace(name="t"), "size"
    )
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            labels = _labels_in_view(ax, renderer)
            assert len(labels) >= 2, (ax.get_xlabel(), labels)  # a scale needs two marks
            for (_, right, text), (left, _, following) in zip(labels, labels[1:], strict=False):
                assert left > right + 2, f"{ax.get_xlabel()}: {text!r} runs into {following!r}"
    finally:
        plt.close(fig)
