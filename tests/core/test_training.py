"""Training loop on tiny synthetic data (resnet18/efficientnet_b0 at 32 px, CPU)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import core.optimization as optimization
import core.training as training
import core.training_data as training_data
import core.validation as validation
from core.checkpoint import ChecksumMismatchError, file_sha256, load_checkpoint
from core.config import TrainConfig
from core.dataset import ImageDataset, SplitSamples, load_splits
from core.labels import CLASSES_15, label_index
from core.optimization import lr_lambda
from core.training import EpochMetrics, TrainResult, train
from core.transforms import EvalPreset, TrainPreset
from tests.factories import make_dataset, make_flat_dataset

# Glioblastoma has more images than Meningioma, so 1/count weights differ per class.
COUNTS = {"Glioblastoma": 8, "Meningioma": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_flat_dataset(tmp_path_factory.mktemp("training"), folders=COUNTS, size=40)


def tiny(data_dir: Path, out_dir: Path, **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "arch": "resnet18",
        "epochs": 2,
        "image_size": 32,
        "batch_size": 4,
        "weights": "none",
        "crop": "none",
        "device": "cpu",
        "oversample": 1.0,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainConfig(data_dir=data_dir, out_dir=out_dir, **settings)


def splits_of(config: TrainConfig) -> SplitSamples:
    return load_splits(config.data_dir, mode=config.labels, seed=config.seed,
                       val_fraction=config.val_fraction, test_fraction=config.test_fraction)


@dataclass
class Observed:
    """One instrumented training run shared by several tests (training is the slow part)."""

    config: TrainConfig
    result: TrainResult
    epochs: list[EpochMetrics] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    loss_weights: list[torch.Tensor | None] = field(default_factory=list)
    loss_calls: int = 0
    # (transform class name, path) for every image a training-time dataset produced
    loaded: list[tuple[str, str]] = field(default_factory=list)
    datasets: list[ImageDataset] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def observed(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    config = tiny(data_dir, tmp_path_factory.mktemp("run") / "out", resume="auto")
    spy_weights: list[torch.Tensor | None] = []
    calls = [0]
    loaded: list[tuple[str, str]] = []
    datasets: list[ImageDataset] = []

    class SpyLoss(torch.nn.CrossEntropyLoss):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            spy_weights.append(None if self.weight is None else self.weight.detach().clone())

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            return super().forward(input, target)

    class SpyDataset(ImageDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            datasets.append(self)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            loaded.append((type(self.transform).__name__, str(self.samples[index].path)))
            return super().__getitem__(index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optimization, "CrossEntropyLoss", SpyLoss)
        mp.setattr(training_data, "ImageDataset", SpyDataset)
        # The tiny split has 2 validation images; calibrate anyway to cover that step.
        mp.setattr(training, "CALIBRATION_MIN_VAL", 1)
        seen_epochs: list[EpochMetrics] = []
        batches: list[tuple[int, int]] = []
        logs: list[str] = []
        result = train(config, on_epoch=seen_epochs.append,
                       on_batch=lambda d, t: batches.append((d, t)), on_log=logs.append)
    yield Observed(config=config, result=result, epochs=seen_epochs, batches=batches,
                   loss_weights=spy_weights, loss_calls=calls[0], loaded=loaded,
                   datasets=datasets, logs=logs)


@pytest.mark.slow
def test_run_writes_all_files(observed: Observed) -> None:
    out = observed.config.out_dir
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "best.pt.sha256", "last.pt", "last.pt.sha256", "metrics.json",
            "test_report.json", "confusion_matrix.png", "training_curves.png"} <= names
    result = observed.result
    assert not result.cancelled and not result.stopped_early and result.resumed_from_epoch == 0
    assert result.best_sha256 == file_sha256(out / "best.pt")
    best = load_checkpoint(out / "best.pt", expected_sha256=result.best_sha256)
    assert best.meta.arch == "resnet18" and best.meta.classes == CLASSES_15
    assert best.meta.preset.image_size == 32 and best.meta.preset.crop == "none"
    assert best.meta.config == observed.config.to_dict()
    assert best.training_state is None
    last = load_checkpoint(out / "last.pt")
    assert last.training_state is not None and last.training_state["epoch"] == 2
    assert last.training_state["finished"] is True
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == [m.to_dict() for m in result.epochs]
    report = json.loads((out / "test_report.json").read_text())
    assert report["n"] == len(splits_of(observed.config).test) == result.test_report.n  # type: ignore[union-attr]
    assert "Glioblastoma" in result.class_table and "Glioblastoma" in observed.logs[0]


@pytest.mark.slow
def test_run_stores_a_fitted_temperature(observed: Observed) -> None:
    from core.calibration import fit_temperature
    from core.evaluation import EvalReport

    out = observed.config.out_dir
    best = load_checkpoint(out / "best.pt", expected_sha256=observed.result.best_sha256)
    cal = best.meta.calibration
    n_val = len(splits_of(observed.config).val)
    assert cal.calibrated and cal.n == n_val and cal.temperature != 1.0
    assert cal.val_nll is not None and cal.val_nll_uncalibrated is not None
    assert cal.val_nll <= cal.val_nll_uncalibrated
    # The temperature is the one fitted on the validation split's raw logits.
    val = ImageDataset(
        splits_of(observed.config).val, EvalPreset(params=best.meta.preset)
    )
    with torch.inference_mode():
        images = torch.stack([val[i][0] for i in range(len(val))])
        logits = best.model(images).numpy()
    labels = [val[i][1] for i in range(len(val))]
    assert cal.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-4)
    # The test report was made with it, and last.pt knows best.pt's new digest.
    report = EvalReport.from_dict(json.loads((out / "test_report.json").read_text()))
    assert report.calibrated and report.temperature == cal.temperature
    assert report.ece is not None and report.ece_uncalibrated is not None
    last = load_checkpoint(out / "last.pt")
    assert last.training_state is not None
    assert last.training_state["best_sha256"] == observed.result.best_sha256
    for name in ("reliability_diagram", "per_class_metrics", "roc_curves", "confident_mistakes"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.slow
def test_callbacks_report_every_epoch_and_batch(observed: Observed) -> None:
    assert [m.epoch for m in observed.epochs] == [1, 2]
    assert tuple(observed.epochs) == observed.result.epochs
    for m in observed.epochs:
        assert math.isfinite(m.train_loss) and math.isfinite(m.val_loss)
        assert 0.0 <= m.val_accuracy <= 1.0 and 0.0 <= m.val_macro_f1 <= 1.0
        assert m.lr > 0 and m.seconds > 0
    # 9 training images, oversample 1 -> 9 draws in batches of 4; the lone 9th image would
    # make a 1-image BatchNorm batch, so it is dropped: 2 batches per epoch.
    assert observed.batches == [(1, 2), (2, 2), (1, 2), (2, 2)]


@pytest.mark.slow
def test_loss_gets_class_weights_in_class_index_order(observed: Observed) -> None:
    train_samples = splits_of(observed.config).train
    expected = torch.zeros(len(CLASSES_15))
    for name in COUNTS:
        index = label_index(name, "15")
        count = sum(1 for s in train_samples if s.label == index)
        assert count > 0
        expected[index] = 1.0 / count
    assert len(observed.loss_weights) == 1
    used = observed.loss_weights[0]
    assert used is not None
    torch.testing.assert_close(used, expected, rtol=0, atol=1e-7)
    # The rarer class weighs more, at its own index (not frequency order).
    assert used[label_index("Meningioma", "15")] > used[label_index("Glioblastoma", "15")] > 0
    assert observed.result.loss_weights == pytest.approx(expected.tolist())
    # That criterion is the one the training batches went through.
    assert observed.loss_calls == len(observed.batches)


@pytest.mark.slow
def test_validation_is_disjoint_and_never_augmented(observed: Observed) -> None:
    splits = splits_of(observed.config)
    train_paths = {str(s.path) for s in splits.train}
    val_paths = {str(s.path) for s in splits.val}
    test_paths = {str(s.path) for s in splits.test}
    assert not train_paths & val_paths and not train_paths & test_paths
    assert not val_paths & test_paths
    by_transform = {type(d.transform): d for d in observed.datasets}
    assert set(by_transform) == {TrainPreset, EvalPreset}
    assert list(by_transform[TrainPreset].samples) == list(splits.train)
    assert {str(s.path) for s in by_transform[EvalPreset].samples} == val_paths
    augmented = {p for kind, p in observed.loaded if kind == "TrainPreset"}
    evaluated = [p for kind, p in observed.loaded if kind == "EvalPreset"]
    assert augmented <= train_paths
    # Every validation image is evaluated once per epoch and once to fit the temperature,
    # without augmentation.
    assert sorted(evaluated) == sorted(list(val_paths) * 3)


@pytest.mark.slow
def test_resume_of_finished_run_only_reevaluates(observed: Observed) -> None:
    seen: list[EpochMetrics] = []
    batches: list[tuple[int, int]] = []
    again = train(observed.config, on_epoch=seen.append,
                  on_batch=lambda d, t: batches.append((d, t)))
    assert again.resumed_from_epoch == 2 and not batches
    assert seen == list(observed.result.epochs)  # re-emitted for idempotent consumers
    assert again.best_sha256 == observed.result.best_sha256
    assert again.test_report == observed.result.test_report


@pytest.mark.slow
def test_resume_after_a_crash_between_calibration_and_last_pt(
    observed: Observed, tmp_path: Path
) -> None:
    import shutil

    from core.checkpoint import save_checkpoint

    # The state a crash leaves right after best.pt got its temperature: last.pt still holds
    # best.pt's digest from before calibration.
    out = tmp_path / "out"
    shutil.copytree(observed.config.out_dir, out)
    last = load_checkpoint(out / "last.pt")
    assert last.training_state is not None
    stale = dict(last.training_state, best_sha256="0" * 64)
    save_checkpoint(out / "last.pt", model=last.model, meta=last.meta, training_state=stale)
    config = tiny(observed.config.data_dir, out, resume="auto")
    again = train(config)
    assert again.best_sha256 == observed.result.best_sha256 == file_sha256(out / "best.pt")
    assert again.test_report == observed.result.test_report
    fixed = load_checkpoint(out / "last.pt").training_state
    assert fixed is not None and fixed["best_sha256"] == again.best_sha256
    # A best.pt that is not the calibrated copy its sidecar vouches for is still refused.
    save_checkpoint(out / "last.pt", model=last.model, meta=last.meta, training_state=stale)
    (out / "best.pt.sha256").write_text("1" * 64 + "  best.pt\n")
    with pytest.raises(ChecksumMismatchError):
        train(config)


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted(data_dir: Path, tmp_path: Path) -> None:
    # efficientnet_b0 has dropout and stochastic depth, so the global RNG state matters too.
    settings: dict[str, Any] = {"arch": "efficientnet_b0", "epochs": 2, "test_fraction": 0.15}
    full = train(tiny(data_dir, tmp_path / "full", **settings))

    done: list[EpochMetrics] = []
    part = train(tiny(data_dir, tmp_path / "part", **settings), on_epoch=done.append,
                 should_stop=lambda: len(done) >= 1)
    assert part.cancelled and [m.epoch for m in part.epochs] == [1]
    assert part.test_report is None
    state = load_checkpoint(part.last_checkpoint).training_state
    assert state is not None and state["epoch"] == 1 and not state["finished"]

    resumed = train(tiny(data_dir, tmp_path / "part", resume=part.last_checkpoint, **settings))
    assert resumed.resumed_from_epoch == 1 and not resumed.cancelled

    a = load_checkpoint(full.last_checkpoint).model.state_dict()
    b = load_checkpoint(resumed.last_checkpoint).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = [{k: v for k, v in m.to_dict().items() if k != "seconds"} for m in full.epochs]
    assert strip == [{k: v for k, v in m.to_dict().items() if k != "seconds"}
                     for m in resumed.epochs]
    assert (load_checkpoint(full.best_checkpoint).meta.weights_sha256
            == load_checkpoint(resumed.best_checkpoint).meta.weights_sha256)
    assert full.test_report is not None and resumed.test_report is not None
    assert full.test_report.confusion_matrix == resumed.test_report.confusion_matrix

    with pytest.raises(ValueError, match="efficientnet_b0"):
        train(tiny(data_dir, tmp_path / "part", arch="resnet18", resume="auto"))


@pytest.mark.slow
def test_cancel_before_first_epoch_leaves_resumable_state(data_dir: Path, tmp_path: Path) -> None:
    result = train(tiny(data_dir, tmp_path / "out"), should_stop=lambda: True)
    assert result.cancelled and result.epochs == () and result.best_sha256 == ""
    assert not result.best_checkpoint.exists()
    state = load_checkpoint(result.last_checkpoint).training_state
    assert state is not None and state["epoch"] == 0 and state["history"] == []


@pytest.mark.slow
def test_early_stopping_on_flat_macro_f1(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A constant validation macro-F1 never improves after epoch 1.
    monkeypatch.setattr(validation, "macro_f1", lambda y_true, y_pred: 0.5)
    logs: list[str] = []
    result = train(tiny(data_dir, tmp_path / "out", epochs=6, early_stopping_patience=1,
                        scheduler="plateau", optimizer="sgd", clip="value",
                        weighted_loss=False, test_fraction=0.0), on_log=logs.append)
    assert result.stopped_early and not result.cancelled
    assert [m.epoch for m in result.epochs] == [1, 2]
    assert result.loss_weights is None
    assert result.test_report is None  # no test split requested
    assert any("early stopping" in m for m in logs)
    best = load_checkpoint(result.best_checkpoint)
    assert best.meta.metrics["epoch"] == 1


@pytest.mark.slow
def test_warm_start_from_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    source = train(tiny(data_dir, tmp_path / "src"), should_stop=lambda: True)
    init = source.last_checkpoint
    logs: list[str] = []
    warm = train(tiny(data_dir, tmp_path / "warm", seed=7, init_checkpoint=init),
                 should_stop=lambda: True, on_log=logs.append)
    a = load_checkpoint(init).model.state_dict()
    b = load_checkpoint(warm.last_checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any("loaded all weights" in m for m in logs)

    # 15 -> 44 labels: same backbone, fresh head.
    data44 = make_dataset(tmp_path, per_folder=4, size=40,
                          folders=("Glioblastoma T1", "Meningioma T2"), name="d44")
    logs.clear()
    other = train(tiny(data44, tmp_path / "w44", labels="44", init_checkpoint=init),
                  should_stop=lambda: True, on_log=logs.append)
    c = load_checkpoint(other.last_checkpoint).model.state_dict()
    assert torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert c["fc.weight"].shape == (44, 512)
    assert any("head starts fresh" in m for m in logs)


def test_lr_schedules_warm_up_then_decay() -> None:
    kw = {"warmup_steps": 4, "total_steps": 20, "steps_per_epoch": 4, "epochs": 5}
    cosine = lr_lambda("cosine", **kw)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(4) == pytest.approx(1.0) and cosine(19) < 0.05
    values = [cosine(s) for s in range(4, 20)]
    assert values == sorted(values, reverse=True)
    step = lr_lambda("step", **kw)
    assert step(4) == 1.0 and step(8) == pytest.approx(0.1) and step(16) == pytest.approx(0.01)
    flat = lr_lambda("none", **kw)
    assert flat(0) == 0.25 and flat(10) == 1.0


def test_macro_f1_matches_definition() -> None:
    assert validation.macro_f1([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    # class 0: tp1 fp0 fn1 -> 2/3; class 1: tp1 fp1 fn0 -> 2/3; class 2 absent everywhere
    assert validation.macro_f1([0, 0, 1], [0, 1, 1]) == pytest.approx(2 / 3)
    assert validation.macro_f1([], []) == 0.0
