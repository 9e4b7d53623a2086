"""Inference benchmark: seconds per study for each built-in model, CPU and (when present) GPU.

Inputs are real samples from ``../shared/dicom-samples`` (path given by
``--samples``): the 30-slice chest CT, the same CT resampled to 300 slices (a
thin-slice study's size), and a chest radiograph. Prints the machine, device,
batch size and precision with each figure.

Run: ``python -m node.bench.inference`` (``make bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from models.base import Model, Volume
from models.registry import create
from node.bench.ingest import machine
from node.infer.volume import build_volume

DEFAULT_SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "dicom-samples"


def thin_slices(volume: Volume, slices: int) -> Volume:
    """The volume resampled along z to ``slices`` slices (trilinear)."""
    x = torch.from_numpy(volume.array)[None, None]
    rows, cols = volume.array.shape[1:]
    y = F.interpolate(x, size=(slices, rows, cols), mode="trilinear", align_corners=False)
    spacing = volume.spacing[0] * volume.array.shape[0] / slices
    return replace(volume, array=y[0, 0].numpy(), spacing=(spacing, *volume.spacing[1:]),
                   slice_uids=())


def timed(model: Model, volume: Volume, repeats: int) -> list[float]:
    model.predict(volume)  # warm-up (allocations, kernels)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(volume)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ct_files = sorted((args.samples / "chest-ct-lung-pet-ct-dx-a0002").glob("*.dcm"))
    ct = build_volume([pydicom.dcmread(p) for p in ct_files]).volume
    cxr = build_volume([pydicom.dcmread(
        args.samples / "chest-xray" / "DX_chest_PA_Canon_966_fixed.dcm")]).volume
    cases = [("ct-lung", f"CT {ct.array.shape[0]} slices", ct),
             ("ct-lung", "CT 300 slices", thin_slices(ct, 300)),
             ("cxr-pneumonia", f"DX {cxr.array.shape[1]}x{cxr.array.shape[2]}", cxr)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for device in devices:
        for name, label, volume in cases:
            model = create(name)
            model.load(device)
            seconds = timed(model, volume, args.repeats)
            median = statistics.median(seconds)
            precision = "float32" if device == "cpu" else "float32 (bf16 autocast where used)"
            print(f"{name:14s} {label:22s} {device:5s} batch 1 study, {precision}: "
                  f"{median:6.2f} s/study ({1 / median:6.2f} studies/s), "
                  f"min {min(seconds):.2f} max {max(seconds):.2f}")
    np.set_printoptions()


if __name__ == "__main__":
    main()
