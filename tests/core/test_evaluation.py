"""Metrics against hand-computed values, report serialisation, plots, checkpoint evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from core.evaluation import (
    EvalReport,
    EvaluationCancelled,
    compute_report,
    evaluate_checkpoint,
)
from core.plots import plot_confusion_matrix, plot_training_curves
from core.training_report import EpochMetrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLS3 = ("a", "b", "c")


def one_hot_scores(pred: list[int], n_classes: int, hi: float = 0.8) -> np.ndarray:
    lo = (1.0 - hi) / (n_classes - 1)
    out = np.full((len(pred), n_classes), lo)
    out[np.arange(len(pred)), pred] = hi
    return out


def brute_force_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Independent reference: fraction of (pos, neg) pairs ranked right, ties count 1/2."""
    pos = scores[positive]
    neg = scores[~positive]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_balanced_three_class_hand_computed() -> None:
    y = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    r = compute_report(y, one_hot_scores(pred, 3), CLS3)
    # confusion (rows = true): [[1,1,0],[0,2,0],[1,0,1]]
    assert r.confusion_matrix == ((1, 1, 0), (0, 2, 0), (1, 0, 1))
    assert r.n == 6
    assert r.accuracy == pytest.approx(4 / 6)
    a, b, c = r.per_class
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert r.macro_precision == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert r.macro_recall == pytest.approx(2 / 3)
    assert r.macro_f1 == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # equal supports: weighted == macro
    assert r.weighted_f1 == pytest.approx(r.macro_f1)
    assert r.top3_accuracy == 1.0  # k = min(3, C) = 3 covers every class


def test_imbalanced_and_class_absent_from_predictions() -> None:
    # 8 x class 0, 2 x class 1, class 2 absent everywhere; the model always says class 0.
    y = [0] * 8 + [1] * 2
    r = compute_report(y, one_hot_scores([0] * 10, 3), CLS3)
    a, b, c = r.per_class
    assert r.accuracy == pytest.approx(0.8)
    assert (a.precision, a.recall, a.f1) == pytest.approx((0.8, 1.0, 8 / 9))
    # never predicted -> precision 0 (zero_division), recall 0
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 2)
    assert c.support == 0
    # macro over labels present in y_true or y_pred (a, b): c is excluded
    assert r.macro_precision == pytest.approx(0.4)
    assert r.macro_recall == pytest.approx(0.5)
    assert r.macro_f1 == pytest.approx(4 / 9)
    assert r.weighted_precision == pytest.approx(0.64)
    assert r.weighted_recall == pytest.approx(0.8)
    assert r.weighted_f1 == pytest.approx(0.8 * 8 / 9)
    assert r.roc_auc_per_class[2] is None  # no positives for c


def test_predicted_class_absent_from_truth_counts_in_macro() -> None:
    y = [0, 0, 0, 0]
    r = compute_report(y, one_hot_scores([0, 0, 0, 1], 3), CLS3)
    # a: P=1, R=.75, F1=6/7; b: predicted but absent -> P=R=F1=0; c: excluded
    assert r.macro_f1 == pytest.approx((6 / 7 + 0.0) / 2)
    assert r.weighted_f1 == pytest.approx(6 / 7)
    assert r.roc_auc_ovr_macro is None  # only one class in y_true: nothing has negatives+pos


def test_single_class_batch_hand_computed() -> None:
    # Every image is class b; one of four is called c. Only b and c occur: macro over them.
    y = [1, 1, 1, 1]
    r = compute_report(y, one_hot_scores([1, 1, 2, 1], 3), CLS3)
    a, b, c = r.per_class
    assert r.accuracy == pytest.approx(0.75)
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((1.0, 0.75, 6 / 7, 4))
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 0)
    assert (a.precision, a.recall, a.f1, a.support) == (0.0, 0.0, 0.0, 0)
    assert r.macro_precision == pytest.approx(0.5)
    assert r.macro_recall == pytest.approx(0.375)
    assert r.macro_f1 == pytest.approx(3 / 7)
    assert r.weighted_f1 == pytest.approx(6 / 7)
    assert r.confusion_matrix == ((0, 0, 0), (0, 3, 1), (0, 0, 0))
    # No class has both positives and negatives: AUC is undefined everywhere.
    assert r.roc_auc_per_class == (None, None, None) and r.roc_auc_ovr_macro is None


def test_all_classes_absent_but_one_and_a_single_sample() -> None:
    r = compute_report([2], np.array([[0.1, 0.2, 0.7]]), CLS3)
    assert r.accuracy == 1.0 and r.macro_f1 == 1.0 and r.top3_accuracy == 1.0
    assert [c.support for c in r.per_class] == [0, 0, 1]
    assert r.ece == pytest.approx(0.3) and r.nll == pytest.approx(-math.log(0.7))


def test_calibration_fields_and_mistakes_hand_computed() -> None:
    y = [0, 0, 1, 1]
    calibrated = np.array([[0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.55, 0.45]])
    raw = np.array([[0.9, 0.1], [0.05, 0.95], [0.1, 0.9], [0.8, 0.2]])
    r = compute_report(
        y, calibrated, ("x", "y"), uncalibrated_probs=raw, temperature=2.0, calibrated=True,
        paths=["p0", "p1", "p2", "p3"],
    )
    assert r.temperature == 2.0 and r.calibrated
    # calibrated: bins (.53,.6]: p0 right conf .6, p3 wrong conf .55 -> |.5 - .575| * 2/4;
    # (.67,.73]: p1 wrong .7 -> .7 * 1/4; (.8-eps,.8]: p2 right .8 -> .2 * 1/4
    assert r.ece == pytest.approx(0.075 / 2 + 0.7 / 4 + 0.2 / 4)
    # raw: p0 right .9 and p2 right .9 share a bin -> .1 * 2/4; p1 wrong .95 -> .95/4;
    # p3 wrong .8 -> .8/4
    assert r.ece_uncalibrated == pytest.approx(0.1 / 2 + 0.95 / 4 + 0.8 / 4)
    assert r.nll == pytest.approx(-np.mean(np.log([0.6, 0.3, 0.8, 0.45])))
    assert r.nll_uncalibrated == pytest.approx(-np.mean(np.log([0.9, 0.05, 0.9, 0.2])))
    assert r.brier == pytest.approx(np.mean([0.32, 0.98, 0.08, 0.605]))
    # Most confident mistake first; the argmax (and so the mistakes) ignore the temperature.
    assert [(m.path, m.true, m.predicted) for m in r.most_confident_mistakes] == [
        ("p1", "x", "y"), ("p3", "y", "x"),
    ]
    assert [m.confidence for m in r.most_confident_mistakes] == pytest.approx([0.7, 0.55])
    assert EvalReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_calibration_fields_absent_for_ranking_scores() -> None:
    # Scores that are no probability distribution rank fine but have no calibration.
    r = compute_report([0, 1], np.array([[3.0, 1.0], [0.0, 2.0]]), ("x", "y"))
    assert r.accuracy == 1.0 and r.ece is None and r.nll is None


def test_report_from_before_calibration_reads_as_uncalibrated() -> None:
    r = compute_report([0, 1], one_hot_scores([0, 1], 3), CLS3)
    old = r.to_dict()
    for key in ("temperature", "calibrated", "ece", "ece_uncalibrated", "nll",
                "nll_uncalibrated", "brier", "brier_uncalibrated", "most_confident_mistakes"):
        del old[key]
    back = EvalReport.from_dict(old)
    assert back.temperature == 1.0 and not back.calibrated and back.ece is None


def test_multiclass_auc_matches_pairwise_reference() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 2, 1, 3])
    # rounding creates many ties on purpose
    scores = np.round(rng.random((y.size, 4)), 1)
    r = compute_report(y, scores, ("a", "b", "c", "d"))
    expected = [brute_force_auc(y == i, scores[:, i]) for i in range(4)]
    assert r.roc_auc_per_class == pytest.approx(expected)
    assert r.roc_auc_ovr_macro == pytest.approx(float(np.mean(expected)))


def test_perfect_classifier() -> None:
    y = [0, 1, 2, 0, 1, 2]
    r = compute_report(y, one_hot_scores(y, 3), CLS3)
    assert r.accuracy == r.macro_f1 == r.weighted_f1 == r.top3_accuracy == 1.0
    assert r.roc_auc_per_class == (1.0, 1.0, 1.0)
    assert r.roc_auc_ovr_macro == 1.0


def test_uninformative_classifier() -> None:
    # identical scores for every class: AUC is exactly 0.5, argmax falls to class 0
    y = [0, 1, 2, 0, 1, 2]
    r = compute_report(y, np.full((6, 3), 1 / 3), CLS3)
    assert r.roc_auc_per_class == (0.5, 0.5, 0.5)
    assert r.accuracy == pytest.approx(1 / 3)
    assert r.per_class[0].recall == 1.0 and r.per_class[1].recall == 0.0


def test_random_scores_auc_near_half() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, size=4000)
    r = compute_report(y, rng.random((4000, 4)), ("a", "b", "c", "d"))
    assert r.roc_auc_ovr_macro == pytest.approx(0.5, abs=0.03)
    assert r.accuracy == pytest.approx(0.25, abs=0.03)


def test_top3_accuracy_with_five_classes() -> None:
    scores = np.array(
        [
            [0.5, 0.2, 0.15, 0.1, 0.05],  # true 2 -> rank 3: hit
            [0.5, 0.2, 0.15, 0.1, 0.05],  # true 3 -> rank 4: miss
            [0.1, 0.1, 0.1, 0.1, 0.6],  # true 4 -> rank 1: hit
            [0.3, 0.3, 0.2, 0.2, 0.0],  # true 3 -> tie with 2, lower index first: miss
        ]
    )
    r = compute_report([2, 3, 4, 3], scores, tuple("abcde"))
    assert r.top3_accuracy == pytest.approx(0.5)


def test_top_k_is_capped_by_class_count() -> None:
    r = compute_report([0, 1], np.array([[0.9, 0.1], [0.8, 0.2]]), ("x", "y"))
    assert r.top3_accuracy == 1.0  # k = min(3, 2)


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_report([0, 1], np.zeros((3, 3)), CLS3)
    with pytest.raises(ValueError, match="outside"):
        compute_report([0, 5], np.zeros((2, 3)), CLS3)
    with pytest.raises(ValueError, match="NaN"):
        compute_report([0], np.array([[math.nan, 0, 0]]), CLS3)


def test_empty_report_is_well_formed() -> None:
    r = compute_report([], np.zeros((0, 3)), CLS3, errors=[("x.png", "empty file")])
    assert r.n == 0 and r.accuracy == 0.0 and r.roc_auc_ovr_macro is None
    assert r.errors == (("x.png", "empty file"),)


def test_to_dict_is_json_with_required_keys_and_round_trips() -> None:
    r = compute_report(
        [0, 0, 1, 2], one_hot_scores([0, 1, 1, 2], 3), CLS3, errors=[("bad.jpg", "corrupt")]
    )
    d = json.loads(json.dumps(r.to_dict()))
    for key in (
        "temperature", "ece", "ece_uncalibrated", "nll", "nll_uncalibrated",
        "n", "accuracy", "macro_f1", "per_class", "confusion_matrix", "classes",
        "macro_precision", "macro_recall", "weighted_precision", "weighted_recall",
        "weighted_f1", "top3_accuracy", "roc_auc_ovr_macro", "roc_auc_per_class", "errors",
    ):
        assert key in d, key
    assert set(d["per_class"][0]) == {"name", "precision", "recall", "f1", "support"}
    assert d["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert d["errors"] == [{"path": "bad.jpg", "reason": "corrupt"}]
    assert EvalReport.from_dict(d) == r


def _is_png(path: Path) -> bool:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_plot_confusion_matrix_writes_png(tmp_path: Path) -> None:
    r = compute_report([0, 1, 2, 2], one_hot_scores([0, 2, 2, 1], 3), CLS3)
    out = plot_confusion_matrix(r, tmp_path / "sub" / "cm.png")
    assert out.exists() and _is_png(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    epochs = [
        EpochMetrics(1, 2.0, 1.8, 0.3, 0.2, 1e-3, 1.0),
        EpochMetrics(2, 1.5, math.nan, 0.5, 0.4, 5e-4, 1.0),
    ]
    assert _is_png(plot_training_curves(epochs, tmp_path / "curves.png"))
    assert _is_png(plot_training_curves([], tmp_path / "empty.png"))


# ---- checkpoint evaluation (real tiny checkpoint through the core API) ----------------


def test_evaluate_checkpoint_records_errors_and_reports(tmp_path: Path) -> None:
    from core.dataset import Sample
    from tests.core.test_inference import make_tiny_checkpoint, write_gray_png

    ckpt = make_tiny_checkpoint(tmp_path)
    good = [write_gray_png(tmp_path / f"img{i}.png", seed=i) for i in range(5)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    samples = [Sample(path=p, label=i % 3, folder="x") for i, p in enumerate(good)]
    samples.insert(2, Sample(path=empty, label=0, folder="x"))
    calls: list[tuple[int, int]] = []
    report = evaluate_checkpoint(
        ckpt, samples, batch_size=2, on_batch=lambda d, t: calls.append((d, t))
    )
    assert report.n == 5
    assert report.classes == tuple(ckpt.meta.classes)
    assert [p for p, _ in report.errors] == [str(empty)]
    assert sum(sum(row) for row in report.confusion_matrix) == 5
    assert calls[-1] == (6, 6)
    # eval preset is deterministic: the same data gives the same report (the likelihood-based
    # calibration numbers up to float rounding, which differs with the batch size)
    again = evaluate_checkpoint(ckpt, samples, batch_size=4)
    fuzzy = ("ece", "ece_uncalibrated", "nll", "nll_uncalibrated", "brier", "brier_uncalibrated")
    for name in fuzzy:
        assert getattr(again, name) == pytest.approx(getattr(report, name), abs=1e-6), name
    mistakes = report.most_confident_mistakes
    assert [(m.path, m.true, m.predicted) for m in again.most_confident_mistakes] == [
        (m.path, m.true, m.predicted) for m in mistakes
    ]
    assert [m.confidence for m in again.most_confident_mistakes] == pytest.approx(
        [m.confidence for m in mistakes], abs=1e-6
    )
    exact = {name: getattr(report, name) for name in fuzzy}
    assert replace(again, most_confident_mistakes=mistakes, **exact) == report
    assert report.nll is not None and report.temperature == 1.0 and not report.calibrated


def test_evaluate_checkpoint_cancel(tmp_path: Path) -> None:
    from core.dataset import Sample
    from tests.core.test_inference import make_tiny_checkpoint, write_gray_png

    ckpt = make_tiny_checkpoint(tmp_path)
    samples = [
        Sample(path=write_gray_png(tmp_path / f"i{i}.png", seed=i), label=0, folder="x")
        for i in range(4)
    ]
    with pytest.raises(EvaluationCancelled):
        evaluate_checkpoint(ckpt, samples, batch_size=1, should_stop=lambda: True)
