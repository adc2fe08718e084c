"""``python -m bench.training``: one epoch of ``core.training.train`` vs a plain PyTorch loop.

    python -m bench.training --arch efficientnet_b0 --image-size 224 --per-folder 4
                             [--batch-size 32] [--device auto] [--repeats 1] [--smoke]

Both sides get the same synthetic data set and split (``core.dataset.load_splits``, same
seed), the same model (``build_model``, weights none), batch size, optimizer (AdamW, same lr
and weight decay), LR schedule (OneCycle), gradient clipping, class-weighted loss, weighted
sampler and augmentation (``TrainPreset`` with the same ``PresetParams``), and on CUDA the
same AMP/channels_last. The compared time is one epoch = the training pass plus the
validation pass, which is what ``EpochMetrics.seconds`` covers in mriq; checkpoint writing,
the test evaluation and plots happen outside it and are shown as the whole-call row.
Target: mriq epoch <= 1.1 x the plain loop's.

Runs are interleaved (plain, mriq, plain, mriq, ...) after a warm-up and the fastest of each
is compared, so a burst of load from elsewhere hits both sides alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bench.common import (
    Measurement,
    Ratio,
    Report,
    Stopwatch,
    add_common_args,
    apply_smoke,
    phase,
    run_report,
    start_report,
    sync,
    workspace,
)

if TYPE_CHECKING:
    from core.config import TrainConfig

MRIQ_EPOCH = "core.training.train epoch (train+val)"
PLAIN_EPOCH = "plain PyTorch loop epoch (train+val)"
MRIQ_CALL = "core.training.train whole call"
PLAIN_CALL = "plain loop whole (split+build+epoch)"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training", description=__doc__.split("\n")[0]
    )
    add_common_args(parser, arch="efficientnet_b0", image_size=224, n=0)
    parser.add_argument(
        "--per-folder",
        type=int,
        default=4,
        help="synthetic images per class folder, 44 folders (%(default)s)",
    )
    parser.add_argument(
        "--source-min", type=int, default=256, help="smallest generated image side (%(default)s)"
    )
    parser.add_argument(
        "--source-max", type=int, default=384, help="largest generated image side (%(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="(%(default)s)")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers on both sides (%(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="interleaved runs of each side; the fastest counts (%(default)s)",
    )
    parser.add_argument(
        "--no-reexec",
        action="store_true",
        help="do not re-exec with the worker's allocator setting",
    )
    args = parser.parse_args(argv)
    apply_smoke(args)
    if args.smoke:
        args.per_folder = 1
        args.source_min, args.source_max = 96, 112
        args.batch_size = 8
        args.repeats = 1
    if args.per_folder < 1 or args.repeats < 1 or args.batch_size < 2:
        parser.error("--per-folder and --repeats must be >= 1, --batch-size >= 2")
    return args


def make_config(
    args: argparse.Namespace, data_dir: Path, out_dir: Path, device: str
) -> TrainConfig:
    from core.config import TrainConfig

    # TrainConfig takes auto/cpu/cuda only (an index goes via CUDA_VISIBLE_DEVICES).
    spec: Literal["cpu", "cuda"] = "cuda" if device.startswith("cuda") else "cpu"
    return TrainConfig(
        data_dir=data_dir,
        out_dir=out_dir,
        arch=args.arch,
        epochs=1,
        image_size=args.image_size,
        batch_size=args.batch_size,
        weights="none",
        device=spec,
        seed=args.seed,
        num_workers=args.num_workers,
        early_stopping_patience=0,
    )


# --------------------------------------------------------------------------------------
# mriq


def run_mriq(cfg: TrainConfig) -> tuple[float, float, int]:
    """(epoch seconds, whole-call seconds, images seen in the epoch)."""
    from core.training import EpochMetrics, train

    epochs: list[EpochMetrics] = []
    batches = [0]

    def on_batch(done: int, total: int) -> None:
        batches[0] = done

    with Stopwatch() as sw:
        train(cfg, on_epoch=epochs.append, on_batch=on_batch)
    if len(epochs) != 1:
        raise RuntimeError(f"expected 1 epoch, train() reported {len(epochs)}")
    return epochs[0].seconds, sw.seconds, batches[0]


# --------------------------------------------------------------------------------------
# plain loop


# The baseline is plain PyTorch written out on purpose: its loaders and split look like
# core.training_data's (``duplicates`` pairs them, and its two DataLoader calls), but if it
# called mriq's code the benchmark would compare mriq with itself.
def run_plain(cfg: TrainConfig) -> tuple[float, float, int]:
    """The same epoch written as a plain loop; (epoch s, whole s, train batches)."""
    import torch
    from torch import nn
    from torch.optim import AdamW
    from torch.optim.lr_scheduler import OneCycleLR
    from torch.utils.data import DataLoader

    from core.dataset import (
        ImageDataset,
        class_counts,
        class_weights,
        load_splits,
        make_weighted_sampler,
    )
    from core.labels import as_label_mode, classes_for
    from core.models import build_model
    from core.transforms import EvalPreset, PresetParams, TrainPreset

    start_all = time.perf_counter()
    device = torch.device(str(cfg.device))
    cuda = device.type == "cuda"
    mode = as_label_mode(cfg.labels)
    n_classes = len(classes_for(mode))
    splits = load_splits(
        cfg.data_dir,
        mode=mode,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    preset = PresetParams(
        image_size=cfg.image_size,
        crop=cfg.crop,
        rotation_degrees=cfg.rotation_degrees,
        hflip_p=cfg.hflip_p,
    )
    train_ds = ImageDataset(splits.train, TrainPreset(params=preset), seed=cfg.seed)
    val_ds = ImageDataset(splits.val, EvalPreset(params=preset), seed=cfg.seed)
    sampler = make_weighted_sampler(
        splits.train,
        n_classes,
        oversample=cfg.oversample,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    drop_last = sampler.num_samples > cfg.batch_size and sampler.num_samples % cfg.batch_size == 1
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=cuda,
        drop_last=drop_last,
    )
    val_loader = DataLoader(
        val_ds,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=cuda,
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, n_classes, weights="none").to(device)
    fmt = torch.channels_last if cuda and cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    weights = class_weights(class_counts(splits.train, n_classes)).to(device)
    criterion = nn.CrossEntropyLoss(weight=weights)
    optimizer = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(loader) * cfg.epochs
    scheduler = OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(steps, 2), pct_start=0.3)
    amp = cuda and cfg.amp
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype) if amp else nullcontext()

    sync(device)
    start = time.perf_counter()
    model.train()
    batches = 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
        labels = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(model(images), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_value)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        batches += 1
    model.eval()
    correct = 0
    with torch.inference_mode():
        for images, labels in val_loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            with autocast():
                logits = model(images)
            correct += int((logits.float().argmax(1).cpu() == labels).sum())
    sync(device)
    end = time.perf_counter()
    return end - start, end - start_all, batches


def warm_up(cfg: TrainConfig) -> None:
    """Two training steps of a throwaway model, so neither side pays first-call set-up."""
    import torch
    from torch import nn

    from core.models import build_model

    device = torch.device(str(cfg.device))
    model = build_model(cfg.arch, 15, weights="none").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync(device)


# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Report:
    from core.synth import synthesize

    # Each bench's own title and context for start_report: alike by shape, not logic.
    device, report = start_report(
        args,
        "mriq training benchmark (one epoch)",
        {
            "arch": args.arch,
            "image_size": args.image_size,
            "per_folder": args.per_folder,
            "batch_size": args.batch_size,
        },
    )
    with workspace(args.workdir, keep=args.keep) as workdir:
        data = workdir / "data"
        with phase("synthesize"):
            summary = synthesize(
                data,
                per_folder=args.per_folder,
                seed=args.seed,
                image_size_range=(args.source_min, args.source_max),
            )
        report.context["images"] = summary.n_images
        base = make_config(args, data, workdir / "warm", device)
        if not args.smoke:
            with phase("warm-up"):
                warm_up(base)
        plain: list[tuple[float, float, int]] = []
        mriq: list[tuple[float, float, int]] = []
        for rep in range(args.repeats):
            with phase(f"plain loop #{rep + 1}"):
                plain.append(run_plain(base))
            with phase(f"core.training.train #{rep + 1}"):
                mriq.append(run_mriq(make_config(args, data, workdir / f"mriq-{rep}", device)))
    p_epoch, p_whole, p_batches = min(plain)
    m_epoch, m_whole, m_batches = min(mriq)
    if p_batches != m_batches:
        report.notes.append(f"batch counts differ: plain {p_batches}, mriq {m_batches}")
    unit_items = m_batches * args.batch_size  # approximate images per training pass
    report.add(Measurement(MRIQ_EPOCH, unit_items, m_epoch, note=f"{m_batches} train batches"))
    report.add(Measurement(PLAIN_EPOCH, unit_items, p_epoch, note=f"{p_batches} train batches"))
    report.add(
        Measurement(
            MRIQ_CALL, unit_items, m_whole, note="+ split hashing, checkpoints, test eval, plots"
        )
    )
    report.add(Measurement(PLAIN_CALL, unit_items, p_whole, note="+ split, model build"))
    report.add_ratio(Ratio("mriq epoch time / plain loop epoch time", m_epoch / p_epoch, "<= 1.1"))
    report.add_ratio(Ratio("mriq whole call / plain whole (informational)", m_whole / p_whole))
    if len(plain) > 1:
        report.notes.append(
            "epoch seconds per run: plain "
            + ", ".join(f"{r[0]:.2f}" for r in plain)
            + "; mriq "
            + ", ".join(f"{r[0]:.2f}" for r in mriq)
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    run_report("bench.training", raw, args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
