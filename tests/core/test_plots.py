"""The evaluation plots: each one a valid PNG, also on degenerate data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from core.calibration import softmax
from core.evaluation import EvalOutputs, compute_report
from core.plots import PLOT_FILES, plot_confident_mistakes, write_evaluation_plots
from tests.core.test_inference import write_gray_png

CLASSES = ("a", "b", "c")


def _outputs(tmp_path: Path, n: int, temperature: float = 2.0) -> EvalOutputs:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)) * 3 + np.eye(3)[y] * 2
    paths = [str(write_gray_png(tmp_path / f"i{i}.png", seed=i)) for i in range(n)]
    probs, raw = softmax(logits, temperature), softmax(logits)
    report = compute_report(
        y, probs, CLASSES, uncalibrated_probs=raw, temperature=temperature, calibrated=True,
        paths=paths,
    )
    return EvalOutputs(report=report, y_true=y, probs=probs, probs_uncalibrated=raw,
                       paths=tuple(paths))


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_every_plot_is_written_as_png(tmp_path: Path) -> None:
    outputs = _outputs(tmp_path, 40)
    assert outputs.report.most_confident_mistakes  # the gallery has tiles to draw
    written = write_evaluation_plots(outputs, tmp_path / "plots")
    assert set(written) == set(PLOT_FILES)
    for kind, path in written.items():
        assert path == tmp_path / "plots" / PLOT_FILES[kind]
        assert _is_png(path), kind
    # no temporary left
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


def test_plots_of_an_empty_evaluation(tmp_path: Path) -> None:
    empty = compute_report([], np.zeros((0, 3)), CLASSES)
    outputs = EvalOutputs(report=empty, y_true=np.zeros(0, dtype=np.int64),
                          probs=np.zeros((0, 3)), probs_uncalibrated=np.zeros((0, 3)), paths=())
    for path in write_evaluation_plots(outputs, tmp_path).values():
        assert _is_png(path)


def test_gallery_survives_a_file_gone_since_the_evaluation(tmp_path: Path) -> None:
    outputs = _outputs(tmp_path, 20)
    Path(outputs.report.most_confident_mistakes[0].path).unlink()
    out = plot_confident_mistakes(outputs.report.most_confident_mistakes, tmp_path / "g.png")
    assert _is_png(out)
