"""Train (or re-evaluate) the built-in ``cxr-pneumonia`` model on PneumoniaMNIST.

Train, select on the official val split, measure on the official test split::

    python -m models.training.train_cxr_pneumonia \\
        --data ../shared/datasets/pneumoniamnist.npz \\
        --out models/weights/cxr_pneumonia.safetensors

Re-measure the shipped weights on the test split without training::

    python -m models.training.train_cxr_pneumonia --evaluate

Everything runs on the CPU with fixed seeds and deterministic torch algorithms, so a run with
the same data, seed, thread count and torch version gives the same weights. The metrics,
the chosen threshold and reference probabilities for a few fixed test images are written to
``cxr_pneumonia.metrics.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from models.base import sha256_file
from models.cxr_pneumonia import (
    ARCHITECTURE,
    INPUT_SIZE,
    METRICS_FILENAME,
    WIDTHS,
    CxrNet,
    CxrPneumoniaModel,
    WeightsMeta,
    default_weights_path,
    read_weights,
    save_weights,
)

DEFAULT_DATA = (Path(__file__).resolve().parents[2] / "shared" / "datasets"
                / "pneumoniamnist.npz")
REFERENCE_INDICES: tuple[int, ...] = tuple(range(8))
"""Test-split indices whose probabilities are recorded for the regression test."""

MEDMNIST_BASELINES: tuple[tuple[str, float, float], ...] = (
    ("ResNet-18 (28)", 0.944, 0.854),
    ("ResNet-50 (28)", 0.948, 0.854),
    ("Google AutoML Vision", 0.991, 0.946),
)
"""(method, test AUC, test ACC) on PneumoniaMNIST from MedMNIST v2 (Yang et al. 2023)."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    ema_decay: float = 0.98
    seed: int = 20240601
    threads: int = 2
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    scale_range: float = 0.1
    contrast_range: float = 0.2
    brightness_range: float = 0.08
    gamma_log_range: float = 0.25


@dataclass(frozen=True)
class Split:
    """One split: images (N, 28, 28) uint8 and labels (N,) in {0, 1}."""

    images: npt.NDArray[np.uint8]
    labels: IntArray


# --------------------------------------------------------------------------- metrics


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0  # average 1-based rank of the tie group
        i = j + 1
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def binary_stats(labels: npt.ArrayLike, probs: npt.ArrayLike, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity and balanced accuracy at ``probs >= threshold``."""
    y = np.asarray(labels).astype(bool).ravel()
    pred = np.asarray(probs, dtype=np.float64).ravel() >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    sens = tp / max(int(y.sum()), 1)
    spec = tn / max(int((~y).sum()), 1)
    return {
        "acc": (tp + tn) / len(y),
        "sensitivity": sens,
        "specificity": spec,
        "balanced_acc": 0.5 * (sens + spec),
    }


def youden_threshold(labels: npt.ArrayLike, probs: npt.ArrayLike) -> float:
    """Threshold that maximises Youden's J (sensitivity + specificity - 1).

    The candidate thresholds are midpoints between consecutive distinct probabilities, so the
    choice does not sit on a val sample. Youden's J is used rather than raw accuracy because it
    does not depend on prevalence, which differs between val (74 % pneumonia) and test (62.5 %).
    Ties are broken towards the threshold closest to 0.5.
    """
    p = np.unique(np.asarray(probs, dtype=np.float64).ravel())
    candidates = np.concatenate([[0.0], (p[:-1] + p[1:]) / 2.0, [1.0]])
    best_t, best_key = 0.5, (-math.inf, -math.inf)
    for t in candidates:
        st = binary_stats(labels, probs, float(t))
        key = (st["sensitivity"] + st["specificity"] - 1.0, -abs(float(t) - 0.5))
        if key > best_key:
            best_t, best_key = float(t), key
    return best_t


# --------------------------------------------------------------------------- data


def load_splits(path: Path) -> dict[str, Split]:
    """Read the MedMNIST ``.npz`` file into train / val / test splits."""
    with np.load(path) as data:
        out = {}
        for name in ("train", "val", "test"):
            images = np.asarray(data[f"{name}_images"], dtype=np.uint8)
            labels = np.asarray(data[f"{name}_labels"]).astype(np.int64).ravel()
            if images.shape[1:] != (INPUT_SIZE, INPUT_SIZE) or len(images) != len(labels):
                raise ValueError(f"{path}: unexpected {name} shapes {images.shape}, {labels.shape}")
            out[name] = Split(images, labels)
    return out


def to_unit(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float32 in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Random small affine transform and intensity jitter of a (N, 1, H, W) batch in [0, 1].

    Geometry: rotation within +-``max_rotation_deg``, isotropic scale within 1 +- ``scale_range``
    and shifts within +-``max_shift_px`` pixels, with border replication. There are no flips:
    a chest radiograph is not left-right symmetric (heart, aortic knuckle, gastric bubble), a
    mirrored film is an anatomically different image (dextrocardia) and a PACS never sends one.
    Intensity: contrast around the image mean, brightness offset and gamma, to tolerate the
    different windowing of DICOM radiographs at inference.
    """
    n, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = torch.deg2rad(uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    scale = uniform(1.0 - cfg.scale_range, 1.0 + cfg.scale_range)
    tx = uniform(-cfg.max_shift_px, cfg.max_shift_px) * 2.0 / w
    ty = uniform(-cfg.max_shift_px, cfg.max_shift_px) * 2.0 / h
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, tx], dim=1), torch.stack([sin, cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    contrast = uniform(1.0 - cfg.contrast_range, 1.0 + cfg.contrast_range).view(n, 1, 1, 1)
    bright = uniform(-cfg.brightness_range, cfg.brightness_range).view(n, 1, 1, 1)
    gamma = torch.exp(uniform(-cfg.gamma_log_range, cfg.gamma_log_range)).view(n, 1, 1, 1)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean + bright).clamp(0.0, 1.0)
    return out.pow(gamma)


# --------------------------------------------------------------------------- training


def set_determinism(seed: int, threads: int) -> None:
    """Seed every generator, force deterministic algorithms and fix the thread count."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)


@torch.inference_mode()
def predict_probs(
    net: CxrNet, images: npt.NDArray[np.uint8], mean: float, std: float, batch: int = 512
) -> FloatArray:
    """Probabilities for (N, 28, 28) uint8 images, in eval mode."""
    net.eval()
    out = []
    x_all = to_unit(images)
    for i in range(0, len(x_all), batch):
        x = (x_all[i : i + batch] - mean) / std
        out.append(torch.sigmoid(net(x)).double().numpy())
    return np.concatenate(out)


@torch.no_grad()
def ema_update(ema: CxrNet, net: CxrNet, decay: float) -> None:
    """Exponential moving average of parameters; buffers (BatchNorm statistics) are copied."""
    for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
        pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers(), strict=True):
        be.copy_(b)


def bce_loss(
    net: CxrNet, images: npt.NDArray[np.uint8], labels: IntArray, mean: float, std: float
) -> float:
    """Mean unweighted binary cross-entropy of ``net`` on a split (eval mode)."""
    probs = np.clip(predict_probs(net, images, mean, std), 1e-7, 1 - 1e-7)
    y = labels.astype(np.float64)
    return float(-np.mean(y * np.log(probs) + (1 - y) * np.log(1 - probs)))


def train(
    splits: dict[str, Split], cfg: TrainConfig, log: bool = True
) -> tuple[CxrNet, float, float, dict[str, Any]]:
    """Train :class:`CxrNet`; return the EMA model with the best val AUC, mean, std, history."""
    set_determinism(cfg.seed, cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    tr, va = splits["train"], splits["val"]
    x_train = to_unit(tr.images)
    y_train = torch.from_numpy(tr.labels.astype(np.float32))
    mean = float(x_train.mean())
    std = float(x_train.std())
    n_pos = int(tr.labels.sum())
    n_neg = len(tr.labels) - n_pos
    pos_weight = torch.tensor(n_neg / n_pos)  # balance the two classes in the loss

    net = CxrNet()
    ema = copy.deepcopy(net)
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2
    )
    best_state: dict[str, torch.Tensor] | None = None
    best_key = (-math.inf, -math.inf)
    best_epoch = -1
    history: list[dict[str, float]] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        net.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = (augment(x_train[idx], cfg, gen) - mean) / std
            logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits, y_train[idx], pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            ema_update(ema, net, cfg.ema_decay)
            total += float(loss.item()) * len(idx)
        val_probs = predict_probs(ema, va.images, mean, std)
        val_auc = roc_auc(va.labels, val_probs)
        val_loss = bce_loss(ema, va.images, va.labels, mean, std)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(perm),
                "val_auc": val_auc,
                "val_loss": val_loss,
            }
        )
        key = (round(val_auc, 6), -val_loss)
        if key > best_key:
            best_key, best_epoch = key, epoch
            best_state = copy.deepcopy(ema.state_dict())
        if log:
            print(
                f"epoch {epoch:3d}  train loss {total / len(perm):.4f}  val AUC {val_auc:.4f}  "
                f"val loss {val_loss:.4f}  {time.perf_counter() - t0:.1f}s"
                f"{'  *' if best_epoch == epoch else ''}",
                flush=True,
            )
    assert best_state is not None
    ema.load_state_dict(best_state)
    ema.eval()
    return ema, mean, std, {"best_epoch": best_epoch, "epochs": history}


# --------------------------------------------------------------------------- reporting


def evaluate(
    net: CxrNet, splits: dict[str, Split], mean: float, std: float, threshold: float
) -> dict[str, dict[str, float]]:
    """AUC and threshold statistics on val and test."""
    out: dict[str, dict[str, float]] = {}
    for name in ("val", "test"):
        sp = splits[name]
        probs = predict_probs(net, sp.images, mean, std)
        stats = {"auc": roc_auc(sp.labels, probs)}
        stats.update(binary_stats(sp.labels, probs, threshold))
        stats["acc_at_0.5"] = binary_stats(sp.labels, probs, 0.5)["acc"]
        stats["n"] = len(sp.labels)
        out[name] = stats
    return out


def reference_predictions(model: CxrPneumoniaModel, test: Split) -> dict[str, Any]:
    """Probabilities of the fixed test images, computed through the public ``predict`` path."""
    from models.base import Volume

    idx = list(REFERENCE_INDICES)
    images = test.images[idx]
    probs, logits = [], []
    for img in images:
        vol = Volume(
            array=(img.astype(np.float32) / 255.0)[None], spacing=(1.0, 1.0, 1.0), modality="CR"
        )
        probs.append(model.predict(vol).findings[0].probability)
        logits.append(model.logit(vol))
    return {
        "split": "test",
        "indices": idx,
        "labels": [int(v) for v in test.labels[idx]],
        "probabilities": probs,
        "logits": logits,
        "images_uint8_base64": base64.b64encode(np.ascontiguousarray(images).tobytes()).decode(),
        "images_shape": list(images.shape),
        "tolerance": 1e-4,
    }


def print_report(metrics: dict[str, dict[str, float]], threshold: float) -> None:
    """Print val / test metrics beside the MedMNIST v2 baselines."""
    print(f"threshold (max Youden J on val): {threshold:.4f}")
    for name in ("val", "test"):
        m = metrics[name]
        print(
            f"{name:5s} AUC {m['auc']:.4f}  ACC {m['acc']:.4f}  sens {m['sensitivity']:.4f}  "
            f"spec {m['specificity']:.4f}  (ACC at 0.5: {m['acc_at_0.5']:.4f}, n={int(m['n'])})"
        )
    for method, auc, acc in MEDMNIST_BASELINES:
        print(f"  MedMNIST v2 baseline {method}: test AUC {auc:.3f}  ACC {acc:.3f}")


def run_training(data: Path, out: Path, cfg: TrainConfig) -> int:
    """Train, select on val, save weights + metrics JSON, print the test metrics."""
    splits = load_splits(data)
    t0 = time.perf_counter()
    net, mean, std, history = train(splits, cfg)
    seconds = time.perf_counter() - t0
    val_probs = predict_probs(net, splits["val"].images, mean, std)
    threshold = youden_threshold(splits["val"].labels, val_probs)
    metrics = evaluate(net, splits, mean, std, threshold)
    meta = WeightsMeta(ARCHITECTURE, threshold, mean, std, INPUT_SIZE, CxrPneumoniaModel.version)
    save_weights(
        net,
        out,
        meta,
        extra={
            "dataset": "PneumoniaMNIST (MedMNIST v2), CC BY 4.0; source Kermany et al. 2018",
            "dataset_sha256": sha256_file(data),
            "trained_with": f"torch {torch.__version__}, seed {cfg.seed}, {cfg.threads} threads",
        },
    )
    model = CxrPneumoniaModel(out)
    model.load("cpu")
    doc: dict[str, Any] = {
        "model": CxrPneumoniaModel.name,
        "version": CxrPneumoniaModel.version,
        "algorithm_version": model.algorithm_version,
        "architecture": {
            "name": ARCHITECTURE,
            "widths": list(WIDTHS),
            "input": [1, 28, 28],
            "parameters": sum(p.numel() for p in net.parameters()),
        },
        "weights_sha256": sha256_file(out),
        "dataset": {
            "file": data.name,
            "sha256": sha256_file(data),
            "counts": {k: len(v.labels) for k, v in splits.items()},
        },
        "normalisation": {"mean": mean, "std": std},
        "threshold": threshold,
        "threshold_rule": "maximum Youden J on the official val split",
        "val": metrics["val"],
        "test": metrics["test"],
        "medmnist_v2_baselines_test": {m: {"auc": a, "acc": c} for m, a, c in MEDMNIST_BASELINES},
        "training": {
            "config": cfg.__dict__,
            "best_epoch": history["best_epoch"],
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "command": "python -m models.training.train_cxr_pneumonia --data "
            + str(data)
            + " --out "
            + str(out),
            "history": history["epochs"],
        },
        "reference_predictions": reference_predictions(model, splits["test"]),
    }
    metrics_path = out.with_name(METRICS_FILENAME)
    metrics_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"training took {seconds:.0f}s; best epoch {history['best_epoch']}")
    print_report(metrics, threshold)
    print(f"weights: {out} ({out.stat().st_size} bytes, {model.algorithm_version})")
    print(f"metrics: {metrics_path}")
    return 0


def run_evaluation(data: Path, weights: Path, threads: int) -> int:
    """Re-measure ``weights`` on val / test; compare with the recorded metrics if present."""
    torch.set_num_threads(threads)
    splits = load_splits(data)
    net, meta = read_weights(weights)
    metrics = evaluate(net, splits, meta.mean, meta.std, meta.threshold)
    model = CxrPneumoniaModel(weights)
    model.load("cpu")
    print(f"weights: {weights} ({model.algorithm_version})")
    print_report(metrics, meta.threshold)
    metrics_path = weights.with_name(METRICS_FILENAME)
    if not metrics_path.is_file():
        return 0
    recorded = json.loads(metrics_path.read_text())
    ok = True
    for split in ("val", "test"):
        for key in ("auc", "acc"):
            diff = abs(recorded[split][key] - metrics[split][key])
            if diff > 1e-6:
                ok = False
                print(
                    f"MISMATCH {split} {key}: recorded {recorded[split][key]:.6f}, "
                    f"now {metrics[split][key]:.6f}"
                )
    ref = reference_predictions(model, splits["test"])
    diffs = np.abs(
        np.array(ref["probabilities"])
        - np.array(recorded["reference_predictions"]["probabilities"])
    )
    if float(diffs.max()) > 1e-4:
        ok = False
        print(f"MISMATCH reference probabilities: max difference {float(diffs.max()):.2e}")
    print("matches the recorded metrics" if ok else "DOES NOT match the recorded metrics")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m models.training.train_cxr_pneumonia",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"PneumoniaMNIST .npz (default {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_weights_path(),
        help="weights file to write (default: the shipped weights)",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="only re-measure the weights given by --out / --weights on test",
    )
    parser.add_argument(
        "--weights", type=Path, default=None, help="weights to evaluate (default: --out)"
    )
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch CPU threads (default min(2, cores)); part of reproducibility",
    )
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"dataset not found: {args.data}")
    if args.evaluate:
        return run_evaluation(args.data, args.weights or args.out, args.threads)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads)
    return run_training(args.data, args.out, cfg)


if __name__ == "__main__":
    sys.exit(main())
