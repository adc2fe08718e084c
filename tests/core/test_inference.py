"""Predictor streaming/order/error behaviour, input expansion, device and thread helpers.

``make_tiny_checkpoint*`` and ``write_gray_png`` are also used by the evaluation and CLI
tests of the same module family.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from core.devices import (
    DeviceUnavailableError,
    configure_cpu_threads,
    cpu_parallelism,
    select_device,
)
from core.inference import Prediction, Predictor

IMAGE_SIZE = 32  # tiny inputs keep a resnet18 forward pass at a few ms on 2 cores


def make_tiny_checkpoint_file(directory: Path, name: str = "tiny.pt") -> tuple[Path, str]:
    """A real resnet18 / 15-class checkpoint with a 32 px, no-crop eval preset."""
    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.labels import CLASSES_15
    from core.models import build_model
    from core.transforms import PresetParams

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet18", len(CLASSES_15), weights="none")
    meta = CheckpointMeta(
        arch="resnet18",
        classes=CLASSES_15,
        label_mode="15",
        preset=PresetParams(image_size=IMAGE_SIZE, crop="none"),
    )
    path = directory / name
    sha = save_checkpoint(path, model=model, meta=meta)
    return path, sha


def make_tiny_checkpoint(directory: Path):  # -> LoadedCheckpoint
    from core.checkpoint import load_checkpoint

    path, sha = make_tiny_checkpoint_file(directory)
    return load_checkpoint(path, expected_sha256=sha)


def write_gray_png(path: Path, *, seed: int, size: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    make_tiny_checkpoint_file(d)
    return d


@pytest.fixture()
def predictor(ckpt_dir: Path) -> Predictor:
    from core.checkpoint import load_checkpoint

    return Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=3)


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    return [write_gray_png(tmp_path / f"img{i}.png", seed=i) for i in range(5)]


def broken_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not a jpeg\n")
    folder = tmp_path / "adir.png"
    folder.mkdir()
    return {"empty": empty, "text": text, "missing": tmp_path / "missing.png", "dir": folder}


# ---- predictor ----------------------------------------------------------------------


def test_order_one_row_per_input_and_error_rows(
    predictor: Predictor, images: list[Path], tmp_path: Path
) -> None:
    bad = broken_files(tmp_path)
    inputs: list[Path] = [
        images[0],
        bad["empty"],
        images[1],
        bad["text"],
        bad["missing"],
        images[2],
        images[3],
        bad["dir"],
        images[4],
    ]
    preds = list(predictor.predict(inputs))
    assert [p.path for p in preds] == [str(p) for p in inputs]
    errors = {Path(p.path) for p in preds if p.error is not None}
    assert errors == set(bad.values())
    for p in preds:
        if p.error is not None:
            assert p.label is None and p.confidence is None and p.top_k == ()
            assert p.error  # a non-empty reason
            assert str(p.path) not in p.error  # the reason only; the path is its own column
        else:
            assert p.label in predictor.classes
            assert len(p.top_k) == 3
            assert p.top_k[0] == (p.label, p.confidence)
            assert [prob for _, prob in p.top_k] == sorted(
                (prob for _, prob in p.top_k), reverse=True
            )


def test_batch_of_only_broken_files(predictor: Predictor, tmp_path: Path) -> None:
    bad = list(broken_files(tmp_path).values())
    preds = list(predictor.predict(bad))
    assert len(preds) == len(bad) and all(p.error for p in preds)


def test_probabilities_sum_to_one(predictor: Predictor, images: list[Path]) -> None:
    results = list(predictor.predict_proba(images))
    assert len(results) == len(images)
    for _, probs, error in results:
        assert error is None and probs is not None
        assert probs.shape == (15,)
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
        assert np.all(probs >= 0)


def test_deterministic_and_uses_eval_preset(
    predictor: Predictor, images: list[Path], ckpt_dir: Path
) -> None:
    from core.imaging import read_image
    from core.transforms import EvalPreset

    first = list(predictor.predict(images))
    assert list(predictor.predict(images)) == first
    # the same file twice, in separate calls, gives bit-identical probabilities: no random
    # augmentation anywhere on the inference path
    ((_, a, _),) = predictor.predict_proba([images[0]])
    ((_, b, _),) = predictor.predict_proba([images[0]])
    assert a is not None and b is not None
    np.testing.assert_array_equal(a, b)
    # and they equal a manual forward pass of the checkpoint's own (unfolded) model through
    # its eval preset
    from core.checkpoint import load_checkpoint

    original = load_checkpoint(ckpt_dir / "tiny.pt").model.eval()
    preset = EvalPreset(params=predictor.meta.preset)
    x = preset(read_image(images[0]))[None]
    with torch.inference_mode():
        ref = torch.softmax(original(x), 1)
    np.testing.assert_allclose(a, ref[0].numpy(), rtol=1e-5, atol=1e-6)


def test_streams_lazily_from_a_generator(predictor: Predictor, images: list[Path]) -> None:
    pulled = 0

    def paths() -> Iterator[Path]:
        nonlocal pulled
        for p in itertools.islice(itertools.cycle(images), 10_000):
            pulled += 1
            yield p

    stream = predictor.predict(paths())
    first = next(stream)
    assert first.path == str(images[0])
    # only the bounded read-ahead was read before the first result came out: the batch
    # being classified, the decode thread's queue and the batch it is building
    ahead = (predictor.prefetch_batches + 2) * predictor.batch_size
    assert pulled <= ahead
    for _ in range(10):
        next(stream)
    assert pulled <= 13 + ahead
    assert isinstance(stream, types.GeneratorType)
    stream.close()
    assert pulled < 100


def test_on_read_marks_each_read_in_the_decode_thread(
    predictor: Predictor, images: list[Path]
) -> None:
    """on_read(i) right before input i is read, on_read(None) right after, in input order,
    from the thread that decodes (the one a native decoder crash would kill)."""
    import threading

    calls: list[tuple[int | None, str]] = []
    preds = list(
        predictor.predict(
            images, on_read=lambda i: calls.append((i, threading.current_thread().name))
        )
    )
    assert len(preds) == len(images)
    expected: list[int | None] = []
    for i in range(len(images)):
        expected += [i, None]
    assert [i for i, _ in calls] == expected
    assert {name for _, name in calls} == {"mriq-decode"}


def test_on_batch_and_should_stop(predictor: Predictor, images: list[Path]) -> None:
    sizes: list[int] = []
    preds = list(predictor.predict(images, on_batch=sizes.append))
    assert sizes == [3, 2] and len(preds) == 5
    batches = 0

    def stop() -> bool:
        return batches >= 1

    def count(n: int) -> None:
        nonlocal batches
        batches += 1

    partial = list(predictor.predict(images, should_stop=stop, on_batch=count))
    assert [p.path for p in partial] == [str(p) for p in images[:3]]


def test_top_k_is_capped_and_configurable(ckpt_dir: Path, images: list[Path]) -> None:
    from core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_dir / "tiny.pt")
    (p,) = Predictor(ckpt, top_k=1).predict(images[:1])
    assert len(p.top_k) == 1
    (p,) = Predictor(ckpt, top_k=99).predict(images[:1])
    assert len(p.top_k) == 15
    assert sum(prob for _, prob in p.top_k) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        Predictor(ckpt, top_k=0)
    with pytest.raises(ValueError):
        Predictor(ckpt, batch_size=0)


def test_worker_processes_keep_order(ckpt_dir: Path, images: list[Path], tmp_path: Path) -> None:
    from core.checkpoint import load_checkpoint

    bad = broken_files(tmp_path)
    inputs = [*images, bad["empty"], *images[::-1], bad["text"]]
    predictor = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=2, num_workers=2)
    preds = list(predictor.predict(iter(inputs)))
    assert [p.path for p in preds] == [str(p) for p in inputs]
    single = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=2)
    for a, b in zip(preds, single.predict(inputs), strict=True):
        assert (a.path, a.label, a.error) == (b.path, b.label, b.error)
        assert (a.confidence or 0.0) == pytest.approx(b.confidence or 0.0, abs=1e-5)


def _forward_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("mriq-forward")]


def test_forward_streams_give_the_same_rows_in_input_order(
    ckpt_dir: Path, images: list[Path], tmp_path: Path
) -> None:
    from core.checkpoint import load_checkpoint

    bad = broken_files(tmp_path)
    # Error-only batches (batch_size 2: [empty, text]) between readable ones, and more
    # batches than streams, so out-of-order completion would show.
    inputs = [*images, bad["empty"], bad["text"], *images[::-1], bad["missing"], *images]
    ckpt = load_checkpoint(ckpt_dir / "tiny.pt")
    single = list(Predictor(ckpt, batch_size=2).predict(inputs))
    for streams in (2, 3):
        sizes: list[int] = []
        multi = Predictor(ckpt, batch_size=2, forward_streams=streams)
        preds = list(multi.predict(iter(inputs), on_batch=sizes.append))
        assert [p.path for p in preds] == [str(p) for p in inputs]
        assert sum(sizes) == len(inputs) and max(sizes) == 2
        for a, b in zip(preds, single, strict=True):
            assert (a.label, a.error) == (b.label, b.error)
            assert (a.confidence or 0.0) == pytest.approx(b.confidence or 0.0, abs=1e-5)
    assert _forward_threads() == []


def test_forward_streams_stop_early_and_leave_no_threads(
    ckpt_dir: Path, images: list[Path]
) -> None:
    from core.checkpoint import load_checkpoint

    multi = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=1, forward_streams=2)
    batches = 0

    def count(_: int) -> None:
        nonlocal batches
        batches += 1

    partial = list(multi.predict(images * 4, should_stop=lambda: batches >= 2, on_batch=count))
    # Stopped after 2 batches; at most the one already submitted beside them also returns.
    assert [p.path for p in partial] == [str(p) for p in (images * 4)[: len(partial)]]
    assert 2 <= len(partial) <= 3
    stream = multi.predict(images * 4)
    next(stream)
    stream.close()  # abandoned mid-job: the pool is shut down with the stream
    assert _forward_threads() == []
    with pytest.raises(ValueError):
        Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), forward_streams=0)


def test_a_forward_failure_in_a_stream_reaches_the_caller(
    ckpt_dir: Path, images: list[Path]
) -> None:
    from core.checkpoint import load_checkpoint

    multi = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=1, forward_streams=2)
    calls = 0
    real = multi._forward

    def flaky(batch: torch.Tensor, raw: bool = False) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("out of memory (simulated)")
        return real(batch, raw)

    multi._forward = flaky  # type: ignore[method-assign]
    got: list[Prediction] = []
    with pytest.raises(RuntimeError, match="simulated"):
        for p in multi.predict(images):
            got.append(p)
    assert [p.path for p in got] == [str(p) for p in images[:2]]
    assert _forward_threads() == []


def test_cpu_parallelism_splits_the_cores() -> None:
    split = {
        n: (c.streams, c.threads) for n in (1, 2, 4, 7, 8, 16, 64) for c in [cpu_parallelism(n)]
    }
    assert split == {
        1: (1, 1), 2: (1, 2), 4: (1, 4), 7: (1, 7), 8: (2, 4), 16: (4, 4), 64: (4, 16)
    }
    assert cpu_parallelism().streams >= 1
    # Streams as asked, the cores shared out between them.
    asked = {(n, s): (c.streams, c.threads) for n, s in ((2, 2), (9, 3), (2, 4))
             for c in [cpu_parallelism(n, streams=s)]}
    assert asked == {(2, 2): (2, 1), (9, 3): (3, 3), (2, 4): (4, 1)}
    with pytest.raises(ValueError):
        cpu_parallelism(0)
    with pytest.raises(ValueError):
        cpu_parallelism(2, streams=0)


def test_prediction_is_frozen() -> None:
    p = Prediction("x.png", None, None, (), "empty file")
    with pytest.raises(AttributeError):
        p.label = "y"  # type: ignore[misc]
    assert not p.ok


# ---- devices and threads ---------------------------------------------------------------


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type in {"cpu", "cuda"}
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            select_device("cuda")
        assert select_device("auto") == torch.device("cpu")


def test_configure_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads(1) == 1
        assert configure_cpu_threads() >= 1
        with pytest.raises(ValueError):
            configure_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_hash_inputs_gives_each_files_sha256(ckpt_dir: Path, tmp_path: Path) -> None:
    import hashlib
    import os

    from core.checkpoint import load_checkpoint

    good = [write_gray_png(tmp_path / f"h{i}.png", seed=10 + i) for i in range(4)]
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    inputs = [good[0], junk, tmp_path / "missing.png", fifo, *good[1:]]
    hashed = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=3, hash_inputs=True)
    preds = list(hashed.predict(inputs))
    assert [p.path for p in preds] == [str(p) for p in inputs]
    for path, pred in zip(inputs, preds, strict=True):
        if path in good or path == junk:
            # unreadable-as-image files are still hashed: the row says what the bytes were
            assert pred.sha256 == hashlib.sha256(path.read_bytes()).hexdigest(), path
        else:  # missing, or a FIFO (never opened blocking, never hashed)
            assert pred.sha256 is None and pred.error is not None, path
    assert preds[1].error is not None and preds[0].ok
    plain = Predictor(load_checkpoint(ckpt_dir / "tiny.pt"), batch_size=3)
    assert all(p.sha256 is None for p in plain.predict(good))


def test_roots_confine_each_input_when_it_is_read(ckpt_dir: Path, tmp_path: Path) -> None:
    import hashlib
    import os

    from core.checkpoint import load_checkpoint

    root, outside = tmp_path / "root", tmp_path / "outside"
    good = [write_gray_png(root / f"g{i}.png", seed=20 + i) for i in range(2)]
    secret = write_gray_png(outside / "secret.png", seed=99)  # decodable: a real lure
    link = root / "link.png"
    link.symlink_to(secret)
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    inside_link = root / "alias.png"
    inside_link.symlink_to(good[0])
    inputs = [good[0], link, fifo, inside_link, good[1]]
    ckpt = load_checkpoint(ckpt_dir / "tiny.pt")
    confined = Predictor(ckpt, batch_size=2, hash_inputs=True, roots=[root])
    preds = list(confined.predict(inputs))
    assert [p.path for p in preds] == [str(p) for p in inputs]
    assert preds[1].error == "leads outside the data roots" and preds[1].sha256 is None
    assert preds[1].label is None and str(outside) not in preds[1].error
    assert preds[2].error == "not a regular file (FIFO)" and preds[2].sha256 is None
    for i in (0, 3, 4):
        assert preds[i].ok and preds[i].sha256 == hashlib.sha256(
            inputs[i].read_bytes()
        ).hexdigest()
    # Without roots the link is read, as python -m core.predict always did.
    free = list(Predictor(ckpt, batch_size=2, hash_inputs=True).predict([link]))
    assert free[0].ok and free[0].sha256 == hashlib.sha256(secret.read_bytes()).hexdigest()


def test_batches_are_built_channels_last_with_the_same_values() -> None:
    from core.decoding import _stack_channels_last

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 9, 7, generator=g) for _ in range(4)]
    batch = _stack_channels_last(images)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images))
    # mismatched shapes fail as torch.stack fails, never by silent broadcasting
    with pytest.raises(RuntimeError):
        _stack_channels_last([torch.rand(3, 9, 7), torch.rand(1, 9, 7)])


def test_confidences_are_temperature_scaled_and_argmax_unchanged(
    tmp_path: Path, images: list[Path]
) -> None:
    from dataclasses import replace

    from core.calibration import Calibration, softmax
    from core.checkpoint import load_checkpoint, save_checkpoint

    path, _ = make_tiny_checkpoint_file(tmp_path)
    raw_ckpt = load_checkpoint(path)
    hot = tmp_path / "hot.pt"
    save_checkpoint(
        hot,
        model=raw_ckpt.model,
        meta=replace(raw_ckpt.meta, calibration=Calibration(temperature=0.25, calibrated=True)),
    )
    scaled = Predictor(load_checkpoint(hot), batch_size=3)
    raw = Predictor(raw_ckpt, batch_size=3)
    assert scaled.temperature == 0.25 and raw.temperature == 1.0
    logits = np.stack([row for _, row, _ in raw.predict_logits(images)])
    expected = softmax(logits, 0.25)
    got = list(scaled.predict(images))
    plain = list(raw.predict(images))
    for i, (p, q) in enumerate(zip(got, plain, strict=True)):
        assert p.label == q.label == scaled.classes[int(logits[i].argmax())]
        assert p.confidence == pytest.approx(float(expected[i].max()), abs=1e-5)
        assert [c for c, _ in p.top_k] == [c for c, _ in q.top_k]
    # A temperature below 1 sharpens: every confidence rises.
    assert all(p.confidence > q.confidence for p, q in zip(got, plain, strict=True))  # type: ignore[operator]
    probs = np.stack([row for _, row, _ in scaled.predict_proba(images)])
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_entropy_is_that_of_the_calibrated_probabilities(
    predictor: Predictor, images: list[Path], tmp_path: Path
) -> None:
    from core.calibration import entropy

    bad = list(broken_files(tmp_path).values())[:1]
    preds = list(predictor.predict([*images, *bad]))
    probs = [row for _, row, _ in predictor.predict_proba(images)]
    for pred, row in zip(preds, probs, strict=False):
        assert row is not None and pred.entropy is not None
        # Over all 15 classes, not the top-k the row keeps.
        assert pred.entropy == pytest.approx(entropy(row), abs=1e-6)
        assert 0.0 <= pred.entropy <= float(np.log(15)) + 1e-6
    assert preds[-1].error is not None and preds[-1].entropy is None
