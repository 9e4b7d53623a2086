"""Built-in ``ct-lung`` model: classical right/left lung segmentation of a chest CT.

Everything in the hot path is a PyTorch tensor operation on the model's device, so the
same code runs on a CPU or a GPU. There are no weights.

Pipeline (``predict``):

1. Body: voxels above -500 HU, largest 3D connected component, holes filled per slice.
   The rest of the work is cropped to the body's bounding box.
2. Lung candidates: voxels below -320 HU at least 5 mm inside the filled body, so the air
   around the patient, inside the table and under clothing is excluded.
3. Trachea and main bronchi: tracked from the most superior slice downward as small,
   central, per-slice components, and removed.
4. 3D connected components of the remaining candidates; the one or two largest that are
   big enough are the lungs. When both lungs form one component, it is cut per slice at
   the column of minimum lung occupancy near the body midline. Small separate pieces of
   a lung in a slice (gas bubbles under the diaphragm) are dropped.
5. Holes inside each lung (vessels, nodules, masses) are filled per slice, then a small
   closing picks up the thinnest vessels.
6. Volume, mean HU and LAA-950 are measured per lung on the full-resolution masks.

Steps 1-4 and the hole filling work on a grid downsampled to about 2.5 mm in every
direction (a 1 mm, 300-slice CT and a 2.5 mm, 120-slice one give grids of the same size),
made by block majority votes of the full-resolution thresholds. Connected components are
labelled by label equivalence: a 3-wide max filter, the maximum also written to the
label's representative voxel (a scatter maximum), then pointer jumping. It needs a
handful of iterations on anatomy (about 5 on the sample; the count grows with the
logarithm of a component's length, 8 for a 8000-voxel serpentine), each a few passes
over the grid. The lung masks are brought back to full resolution by intersecting with
the full-resolution air threshold, inside each lung's bounding box only.

Speed on 2 free CPU cores: 0.13 s for the 30-slice sample, 1.2 s for the same CT
resampled to 300 slices of 512 x 512 (0.5 s and 8.9 s before the labelling and the
full-resolution steps were rewritten), with about 0.3 GB of working memory. The
full-resolution work is two thresholds, the block sums and the per-lung closing; the
rest scales with the grid. The grid work is many short whole-tensor operations, so when
other processes keep the cores busy, OpenMP's spinning waits can make it several times
slower; OMP_WAIT_POLICY=PASSIVE (or one thread) avoids that.

Orientation assumption: standard axial CT, ImageOrientationPatient 1\\0\\0\\0\\1\\0.
Columns then increase toward the patient's LEFT (the patient's left lung is on the
image's right), and the slice normal points to the patient's head, so the last slice of
the volume (largest position along the normal) is the most superior one. The caller orders the
slices along the normal, so the direction of acquisition (head or feet first) does not
matter. Other orientations (prone, a flipped row or column direction, coronal or sagittal
reformats, oblique slices) are refused: :class:`~models.base.Volume` carries the series'
ImageOrientationPatient, and :meth:`CtLungModel.check_input` raises
:class:`~models.base.UnsupportedInput` unless it is within 0.05 of 1\\0\\0\\0\\1\\0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.base import (
    AXIAL,
    Code,
    InputSpec,
    Measurement,
    Model,
    ModelError,
    Prediction,
    Segment,
    UnsupportedInput,
    Volume,
)

# --- thresholds (HU) and sizes; immutable module constants -----------------------------

BODY_HU = -500.0
"""Voxels above this are body (soft tissue, bone, fat); air and lung are below it."""
AIR_HU = -320.0
"""Voxels below this are air-like: lung parenchyma, airways, outside air, bowel gas."""
LAA_HU = -950.0
"""Threshold of the low attenuation area (emphysema index) LAA-950."""
GRID_MM = 2.5
"""Target voxel size (mm) of the working grid for the component analysis."""
MIN_LUNG_ML = 100.0
"""Smallest air component accepted as a lung. Paranasal sinuses and mastoids total far less."""
MIN_LUNG_EXTENT_MM = 30.0
"""Smallest cranio-caudal extent of a lung component."""
MIN_SECOND_LUNG_RATIO = 0.15
"""A second component must be at least this fraction of the first to count as a lung."""
MERGED_SIDE_FRACTION = 0.25
"""A component with at least this fraction on each side of the midline holds both lungs."""
TRACHEA_MIN_MM2 = 30.0
TRACHEA_MAX_MM2 = 700.0
"""Per-slice area range (mm2) of a trachea or main-bronchus cross-section."""
TRACHEA_CENTRAL_FRACTION = 0.15
"""A trachea seed lies within this fraction of the body width from the body's midline."""
TRACHEA_TRACK_MM = 10.0
"""In-plane search radius (mm) when following the airway to the next slice."""
CHEST_WALL_MM = 5.0
"""Candidates lie at least this deep inside the body: drops air trapped in skin folds or
between the skin and clothing or blankets. The chest wall is thicker than this."""
MIN_PIECE_MM2 = 100.0
"""Per slice, a separate piece of a lung smaller than this (mm2) is dropped unless it is
the lung's largest piece in that slice: gas bubbles in the stomach or bowel that touch
the lung base through partial-volume voxels of the diaphragm dome."""
SPLIT_SEARCH_MM = 60.0
"""Half-width (mm) of the band around the body midline searched for the lung split."""
SPLIT_SLICE_MM = 30.0
"""Half-width (mm) of the per-slice refinement of the split column."""
CLOSING_MM = 2.0
"""Radius (mm) of the full-resolution closing that fills the smallest vessels."""

# --- codes ---------------------------------------------------------------------------

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
LUNG = Code("39607008", "SCT", "Lung")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
MILLILITER = Code("ml", "UCUM", "milliliter")
HOUNSFIELD = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = Code("%", "UCUM", "percent")
# LAA-950 has no code in DCM (PS3.16 CID 6142 "Calculation Value" has e.g. 112019
# "Calcification extent as percent of volume", but nothing for low attenuation), nor a
# SNOMED CT observable entity we could find, nor an IBSI feature for a fixed-threshold
# volume fraction in pydicom's concept dictionary. DICOM allows private coding schemes
# whose designator starts with "99", so the node uses its own scheme "99AINODE". An SR
# that carries it should declare the scheme in the Coding Scheme Identification Sequence.
LAA_950 = Code("LAA950", "99AINODE", "Percent of lung volume below -950 HU (LAA-950)")

RIGHT_LUNG = 1
LEFT_LUNG = 2


# --- tensor helpers --------------------------------------------------------------------


def _shift_max(x: torch.Tensor, dim: int, step: int = 1) -> torch.Tensor:
    """Maximum of ``x`` and its two neighbours ``step`` away along ``dim``."""
    n = x.shape[dim]
    out = x.clone()
    if n > step:
        head = out.narrow(dim, step, n - step)
        torch.maximum(head, x.narrow(dim, 0, n - step), out=head)
        tail = out.narrow(dim, 0, n - step)
        torch.maximum(tail, x.narrow(dim, step, n - step), out=tail)
    return out


def _max_filter(x: torch.Tensor, dims: Sequence[int], box: bool = True) -> torch.Tensor:
    """3-wide max filter over ``dims``: a full box (8/26-neighbours) or a cross (4/6)."""
    out = x
    for dim in dims:
        if box:
            out = _shift_max(out, dim)
        elif out is x:
            out = _shift_max(x, dim)
        else:
            torch.maximum(out, _shift_max(x, dim), out=out)
    return out


def _dilate(mask: torch.Tensor, dims: Sequence[int], radius: int) -> torch.Tensor:
    """Binary dilation by a (2 * radius + 1) box over ``dims``.

    Separable, and each dim's window about doubles per pass: a window of reach ``r``
    taken again at offsets +-s reaches r + s without gaps. s <= r + 1 (not the gapless
    limit 2r + 1) keeps it exact at the tensor's ends, where the windows of the positions
    outside are lost. Radius 3 takes two passes per dim instead of three, 7 three.
    """
    for dim in dims:
        reach = 0
        while reach < radius:
            step = min(reach + 1, radius - reach)
            mask = _shift_max(mask, dim, step)
            reach += step
    return mask


def _erode(mask: torch.Tensor, dims: Sequence[int], radius: int) -> torch.Tensor:
    """Binary erosion by a (2 * radius + 1) box over ``dims`` (the border counts as inside)."""
    return ~_dilate(~mask, dims, radius)


_JUMPS = 2
"""Pointer jumps per iteration of :func:`_label`."""


def _label(mask: torch.Tensor, dims: Sequence[int], box: bool = True) -> torch.Tensor:
    """Connected components of ``mask`` over ``dims`` (which include the last two) as
    int32 labels; 0 is background.

    Label equivalence with hooking and pointer jumping, all in whole-tensor operations:
    every voxel starts with its own flat index + 1 as its label, which points at a voxel
    of its component (its representative). Each iteration takes the maximum label over
    the neighbourhood (box or cross), raises both the voxel's label and its
    representative's label to it (a scatter maximum, so a whole partial component moves
    at once), then jumps twice through the label table (a voxel whose label points at
    voxel u takes u's label). Labels only grow and always name a voxel of the same
    component, so it terminates; it stops when no neighbourhood maximum differs from the
    voxel's label, after a handful of iterations on anatomy: 5 or 6 per call on the
    sample, and 8 for a serpentine path of 8000 voxels, where propagation to neighbours
    alone would need thousands. Labels are unique across the whole tensor, not
    consecutive, and each names a voxel of its component; components in different slices
    stay separate when ``dims`` leaves the slice axis out.
    """
    n = mask.numel()
    if n >= 2**31 - 1:
        raise ModelError(f"working grid too large to label: {tuple(mask.shape)}")
    background = ~mask.flatten()
    # table[i] is the label of flat voxel i - 1; table[0] = 0 is the background's.
    table = torch.arange(n + 1, device=mask.device, dtype=torch.int32)
    table[1:].masked_fill_(background, 0)
    while True:
        labels = table[1:]
        grown = _max_filter(labels.view(mask.shape), dims, box).flatten()
        grown.masked_fill_(background, 0)
        if torch.equal(grown, labels):
            return labels.view(mask.shape)
        table.scatter_reduce_(0, labels.long(), grown, reduce="amax")
        torch.maximum(labels, grown, out=labels)
        for _ in range(_JUMPS):
            table = table[table.long()]


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, slice]:
    """Rows and columns (last two dims) holding any of ``mask``, grown by ``margin``.

    ``mask`` must not be empty.
    """
    plane = mask.reshape(-1, *mask.shape[-2:]).any(dim=0)
    rows = torch.nonzero(plane.any(dim=1))[:, 0]
    cols = torch.nonzero(plane.any(dim=0))[:, 0]
    height, width = plane.shape
    return (
        slice(max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + 1 + margin)),
        slice(max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + 1 + margin)),
    )


def _fill_holes_2d(mask: torch.Tensor) -> torch.Tensor:
    """Fill, per slice, the background regions that do not reach the slice border.

    Works on the bounding box of ``mask`` plus a one-pixel background ring, which
    connects the same background regions as the full slice.
    """
    if not bool(mask.any()):
        return mask
    rows, cols = _bounding_box(mask, margin=1)
    filled = mask.clone()
    filled[..., rows, cols] = _fill_enclosed(mask[..., rows, cols])
    return filled


def _fill_enclosed(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` plus, per slice, its background regions that do not reach the border."""
    background = _label(~mask, dims=(-2, -1), box=False)
    edges = torch.cat(
        (
            background[..., 0, :].flatten(),
            background[..., -1, :].flatten(),
            background[..., :, 0].flatten(),
            background[..., :, -1].flatten(),
        )
    )
    outside = torch.isin(background, torch.unique(edges)) & ~mask
    return ~outside


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 26-connected 3D component of ``mask`` (empty if ``mask`` is empty)."""
    labels = _label(mask, dims=(0, 1, 2))
    ids, counts = torch.unique(labels[mask], return_counts=True)
    if ids.numel() == 0:
        return mask
    return torch.eq(labels, ids[torch.argmax(counts)])


def _block_fraction(mask: torch.Tensor, factors: tuple[int, int, int]) -> torch.Tensor:
    """Fraction of True voxels in each block of ``factors`` (float32, one per block).

    Partial blocks at the far edges count their own voxels only. The blocks are summed
    with strided integer additions, one dim at a time (slices first), which is several
    times faster than ``avg_pool3d`` on a float copy of a full-resolution mask and
    needs no such copy.
    """
    dtype = torch.uint8 if math.prod(factors) < 256 else torch.int32
    total = mask.view(torch.uint8) if dtype == torch.uint8 else mask.to(dtype)
    divisor = torch.ones((1, 1, 1), device=mask.device)
    for dim in (0, 2, 1):
        factor = factors[dim]
        if factor == 1:
            continue
        size = total.shape[dim]
        blocks = -(-size // factor)
        index: list[slice] = [slice(None)] * 3
        index[dim] = slice(0, None, factor)
        summed = total[tuple(index)].clone(memory_format=torch.contiguous_format)
        for offset in range(1, min(factor, size)):
            index[dim] = slice(offset, None, factor)
            part = total[tuple(index)]
            summed.narrow(dim, 0, part.shape[dim]).add_(part)
        total = summed
        counts = torch.full((blocks,), float(factor), device=mask.device)
        counts[-1] = size - (blocks - 1) * factor
        shape = [1, 1, 1]
        shape[dim] = blocks
        divisor = divisor * counts.view(shape)
    return total.float() / divisor


def _downsample(
    mask: torch.Tensor, factors: tuple[int, int, int], quorum: float = 0.5
) -> torch.Tensor:
    """True where more than ``quorum`` of a block of ``factors`` is True.

    0.5 is a majority vote; a quorum just under 1 keeps only blocks that are all True.
    Partial blocks at the far edges count their own voxels only.
    """
    if factors == (1, 1, 1):
        return mask
    return _block_fraction(mask, factors) > quorum


Region = tuple[slice, slice, slice]
"""A box of a volume: slices, rows, columns (steps of 1, bounds within the shape)."""


def _upsample(grid: torch.Tensor, factors: tuple[int, int, int], region: Region) -> torch.Tensor:
    """Nearest-neighbour inverse of :func:`_downsample`, only over ``region`` of the
    full-resolution volume (a view of one contiguous block)."""
    sub = []
    crop = []
    for dim in range(3):
        factor, part = factors[dim], region[dim]
        first, stop = part.start // factor, -(-part.stop // factor)
        sub.append(slice(first, stop))
        crop.append(slice(part.start - first * factor, part.stop - first * factor))
    block = grid[sub[0], sub[1], sub[2]]
    (d, h, w), (f0, f1, f2) = block.shape, factors
    full = (
        block[:, None, :, None, :, None].expand(d, f0, h, f1, w, f2).reshape(d * f0, h * f1, w * f2)
    )
    return full[crop[0], crop[1], crop[2]]


# --- anatomy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Geometry of the working grid: downsampling factors and voxel sizes (mm)."""

    factors: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def for_volume(cls, spacing: tuple[float, float, float]) -> _Grid:
        """Choose factors so that the working voxels are about ``GRID_MM`` wide."""
        factors = tuple(max(1, round(GRID_MM / s)) for s in spacing)
        f0, f1, f2 = factors
        return cls((f0, f1, f2), (spacing[0] * f0, spacing[1] * f1, spacing[2] * f2))

    @property
    def full_spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the full-resolution volume."""
        f0, f1, f2 = self.factors
        return (self.spacing[0] / f0, self.spacing[1] / f1, self.spacing[2] / f2)

    @property
    def pixel_mm2(self) -> float:
        return self.spacing[1] * self.spacing[2]

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000.0

    def pixels(self, mm: float) -> int:
        """An in-plane distance in working-grid pixels (at least 1)."""
        return max(1, round(mm / self.spacing[2]))


def _body(hu_grid_body: torch.Tensor) -> torch.Tensor:
    """Body mask on the working grid: largest component with its per-slice holes filled."""
    return _fill_holes_2d(_largest_component(hu_grid_body))


def _midline(body: torch.Tensor) -> tuple[float, float]:
    """Column of the body's centroid and the body's width, in working-grid pixels."""
    cols = torch.nonzero(body)[:, 2].float()
    if cols.numel() == 0:
        return body.shape[2] / 2.0, float(body.shape[2])
    width = float(cols.max() - cols.min() + 1)
    return float(cols.mean()), width


def _slice_components(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, pixel counts and mean columns of the non-zero labels of one 2D label image."""
    mask = labels > 0
    ids, inverse, counts = torch.unique(labels[mask], return_inverse=True, return_counts=True)
    cols = torch.nonzero(mask)[:, 1].to(torch.float32)
    col_sum = torch.zeros(ids.numel(), device=labels.device).index_add_(0, inverse, cols)
    return ids, counts, col_sum / counts.clamp(min=1)


def _trachea(candidates: torch.Tensor, body: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Trachea and main bronchi on the working grid (empty if no airway seed is found).

    The seed is a small air component near the body midline in the most superior slices,
    searched down to the first slice that already holds a large (lung-sized) component.
    It is followed slice by slice toward the feet: components overlapping the airway of
    the slice above (within ``TRACHEA_TRACK_MM``) and still small are airway; a large one
    is a lung the bronchus has entered, and the tracking of that branch ends there.

    Components are 4-connected: where the tracheal wall is one working pixel thin, its
    partial-volume blocks can leave a diagonal chain of all-air blocks between the lumen
    and a lung apex. With 8-connectivity one such slice ended the tracking early on
    thin-slice CTs (the sample resampled to 60 to 300 slices kept the lower trachea and
    a main bronchus, about 20 mL, in the left lung).
    """
    labels = _label(candidates, dims=(1, 2), box=False)
    airway = torch.zeros_like(candidates)
    mid, width = _midline(body)
    min_px = TRACHEA_MIN_MM2 / grid.pixel_mm2
    max_px = TRACHEA_MAX_MM2 / grid.pixel_mm2
    start = -1
    for k in range(candidates.shape[0] - 1, -1, -1):
        ids, counts, cols = _slice_components(labels[k])
        if ids.numel() == 0:
            continue
        central = (cols - mid).abs() <= TRACHEA_CENTRAL_FRACTION * width
        seeds = ids[central & (counts >= min_px) & (counts <= max_px)]
        if seeds.numel() > 0:
            airway[k] = torch.isin(labels[k], seeds)
            start = k
            break
        if bool((counts > max_px).any()):
            return airway
    if start < 0:
        return airway
    radius = grid.pixels(TRACHEA_TRACK_MM)
    for k in range(start - 1, -1, -1):
        near = _dilate(airway[k + 1], dims=(0, 1), radius=radius) & candidates[k]
        touching = torch.unique(labels[k][near])
        if touching.numel() == 0:
            break
        ids, counts, _ = _slice_components(labels[k])
        small = ids[counts <= max_px]
        branches = touching[torch.isin(touching, small)]
        if branches.numel() == 0:
            break
        airway[k] = torch.isin(labels[k], branches)
    return airway


@dataclass(frozen=True)
class _Component:
    """Statistics of one 3D candidate component on the working grid."""

    label: int
    ml: float
    extent_mm: float
    image_left_fraction: float
    """Fraction of the voxels in columns left of the midline (the patient's right)."""


def _components(
    labels: torch.Tensor, mask: torch.Tensor, mid: float, grid: _Grid
) -> list[_Component]:
    """Per-component statistics, largest first."""
    ids, inverse, counts = torch.unique(labels[mask], return_inverse=True, return_counts=True)
    coords = torch.nonzero(mask)
    n = ids.numel()
    device = labels.device
    left = torch.zeros(n, device=device).index_add_(0, inverse, (coords[:, 2] < mid).float())
    top = torch.full((n,), -1, device=device, dtype=torch.int64)
    top = top.scatter_reduce(0, inverse, coords[:, 0], reduce="amax")
    bottom = torch.full((n,), labels.shape[0], device=device, dtype=torch.int64)
    bottom = bottom.scatter_reduce(0, inverse, coords[:, 0], reduce="amin")
    stats = zip(
        ids.tolist(),
        counts.tolist(),
        (top - bottom + 1).tolist(),
        (left / counts).tolist(),
        strict=True,
    )
    found = [
        _Component(int(i), c * grid.voxel_ml, s * grid.spacing[0], float(f)) for i, c, s, f in stats
    ]
    return sorted(found, key=lambda comp: comp.ml, reverse=True)


def _split_merged(lungs: torch.Tensor, mid: float, grid: _Grid) -> torch.Tensor:
    """Cut a component holding both lungs per slice; returns True for the image-left part.

    The cut column of each slice is where the lung occupancy (pixels per column) is lowest,
    near the column that is lowest over the whole volume within ``SPLIT_SEARCH_MM`` of the
    body midline; a small distance penalty breaks ties (several empty columns) toward it.
    """
    cols = torch.arange(lungs.shape[2], device=lungs.device, dtype=torch.float32)
    per_slice = lungs.sum(dim=1).float()  # (slices, columns)
    band = grid.pixels(SPLIT_SEARCH_MM)
    total = per_slice.sum(dim=0) + (cols - mid).abs() * 1e-3
    total = torch.where((cols - mid).abs() <= band, total, math.inf)
    centre = torch.argmin(total).float()
    penalty = (cols - centre).abs() * 1e-3
    near = (cols - centre).abs() <= grid.pixels(SPLIT_SLICE_MM)
    cost = torch.where(near, per_slice + penalty, math.inf)
    cut = torch.argmin(cost, dim=1).float()  # (slices,)
    return cols[None, None, :] < cut[:, None, None]


def _find_lungs(candidates: torch.Tensor, body: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Lung labels on the working grid: 0 none, 1 right lung, 2 left lung.

    Raises :class:`UnsupportedInput` when no air component is large enough to be a lung.
    """
    mid, _ = _midline(body)
    labels = _label(candidates, dims=(0, 1, 2), box=False)
    found = [
        c
        for c in _components(labels, candidates, mid, grid)
        if c.ml >= MIN_LUNG_ML and c.extent_mm >= MIN_LUNG_EXTENT_MM
    ]
    if not found:
        raise UnsupportedInput(
            "no lung found: no air region inside the body of at least "
            f"{MIN_LUNG_ML:.0f} mL and {MIN_LUNG_EXTENT_MM:.0f} mm cranio-caudal extent "
            "(is this a chest CT?)"
        )
    first = found[0]
    out = torch.zeros(candidates.shape, device=candidates.device, dtype=torch.int64)
    first_mask = labels == first.label
    if min(first.image_left_fraction, 1.0 - first.image_left_fraction) >= MERGED_SIDE_FRACTION:
        image_left = _split_merged(first_mask, mid, grid)
        out[first_mask & image_left] = RIGHT_LUNG
        out[first_mask & ~image_left] = LEFT_LUNG
        return out
    first_is_right = first.image_left_fraction >= 0.5
    out[first_mask] = RIGHT_LUNG if first_is_right else LEFT_LUNG
    for other in found[1:]:
        other_is_right = other.image_left_fraction >= 0.5
        if other_is_right != first_is_right and other.ml >= MIN_SECOND_LUNG_RATIO * first.ml:
            out[labels == other.label] = RIGHT_LUNG if other_is_right else LEFT_LUNG
            break
    return out


def _drop_specks(lung_ids: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """Remove, per slice and lung, in-plane pieces below ``MIN_PIECE_MM2`` that are not the
    lung's largest piece in that slice."""
    out = torch.zeros_like(lung_ids)
    for number in (RIGHT_LUNG, LEFT_LUNG):
        lung = lung_ids == number
        if not bool(lung.any()):
            continue
        rows, cols = _bounding_box(lung, margin=0)
        out[:, rows, cols] += torch.where(_keep_pieces(lung[:, rows, cols], grid), number, 0)
    return out


def _keep_pieces(lung: torch.Tensor, grid: _Grid) -> torch.Tensor:
    """``lung`` without the small pieces that :func:`_drop_specks` removes."""
    labels = _label(lung, dims=(1, 2))
    ids, inverse, counts = torch.unique(labels[lung], return_inverse=True, return_counts=True)
    # A label is the largest flat index of its piece + 1, so it names the piece's slice.
    plane = torch.div(ids.long() - 1, lung.shape[1] * lung.shape[2], rounding_mode="floor")
    largest = torch.zeros(lung.shape[0], device=ids.device, dtype=counts.dtype)
    largest = largest.scatter_reduce(0, plane, counts, reduce="amax")
    keep = (counts * grid.pixel_mm2 >= MIN_PIECE_MM2) | (counts == largest[plane])
    kept = torch.zeros_like(lung)
    kept[lung] = keep[inverse]
    return kept


def _lung_region(grown: torch.Tensor, grid: _Grid, shape: Sequence[int], margin: int) -> Region:
    """Full-resolution box of ``shape`` holding the upsampled ``grown`` (which must not
    be empty), widened in-plane by ``margin`` voxels."""
    slices = torch.nonzero(grown.flatten(1).any(dim=1))[:, 0]
    rows, cols = _bounding_box(grown, margin=0)
    f0, f1, f2 = grid.factors
    return (
        slice(int(slices[0]) * f0, min((int(slices[-1]) + 1) * f0, shape[0])),
        slice(max(0, rows.start * f1 - margin), min(rows.stop * f1 + margin, shape[1])),
        slice(max(0, cols.start * f2 - margin), min(cols.stop * f2 + margin, shape[2])),
    )


def _overlap(a: Region, b: Region) -> tuple[Region, Region] | None:
    """The intersection of two regions, relative to each of them (None when empty)."""
    in_a, in_b = [], []
    for x, y in zip(a, b, strict=True):
        low, high = max(x.start, y.start), min(x.stop, y.stop)
        if low >= high:
            return None
        in_a.append(slice(low - x.start, high - x.start))
        in_b.append(slice(low - y.start, high - y.start))
    return (in_a[0], in_a[1], in_a[2]), (in_b[0], in_b[1], in_b[2])


def _full_resolution(
    lung_ids: torch.Tensor,
    airway: torch.Tensor,
    inside: torch.Tensor,
    air: torch.Tensor,
    grid: _Grid,
) -> dict[int, tuple[Region, torch.Tensor]]:
    """Full-resolution mask of each lung found on the working grid, as its region of
    ``air`` (the full-resolution air threshold) and the mask cropped to that region.

    Each lung is grown by one working pixel in-plane (it recovers air voxels lost by the
    majority vote of the downsampling) without entering the airway, the other lung or
    what both would claim, intersected with the full-resolution air threshold, completed
    with its per-slice holes (vessels) from the working grid, and closed by ``CLOSING_MM``.
    The work is done in the lung's bounding box widened by twice the closing radius, so
    the closing gives the same result as over the whole volume.
    """
    present = [n for n in (RIGHT_LUNG, LEFT_LUNG) if bool((lung_ids == n).any())]
    cores = {n: lung_ids == n for n in present}
    grown = {
        n: _dilate(core, dims=(1, 2), radius=1)
        & inside
        & ~airway
        & ((lung_ids == n) | (lung_ids == 0))
        for n, core in cores.items()
    }
    if len(present) == 2:
        contested = grown[RIGHT_LUNG] & grown[LEFT_LUNG]
        for n in present:
            grown[n] &= ~contested | cores[n]
    radius = max(1, round(CLOSING_MM / grid.full_spacing[2]))
    crops = {}
    for n in present:
        region = _lung_region(grown[n], grid, air.shape, margin=2 * radius)
        filled = _fill_holes_2d(cores[n])
        holes = _upsample(filled & ~cores[n], grid.factors, region)
        mask = (air[region] & _upsample(grown[n], grid.factors, region)) | holes
        mask = _erode(_dilate(mask, dims=(1, 2), radius=radius), dims=(1, 2), radius=radius)
        crops[n] = (region, mask & _upsample(inside, grid.factors, region))
    if len(present) == 2:
        (right_region, right), (left_region, left) = crops[RIGHT_LUNG], crops[LEFT_LUNG]
        common = _overlap(right_region, left_region)
        if common is not None:
            left[common[1]] &= ~right[common[0]]
    return crops


def _lung_crops(
    hu: torch.Tensor, spacing: tuple[float, float, float]
) -> dict[int, tuple[Region, torch.Tensor]]:
    """Right (1) and left (2) lung masks, each as a region of ``hu`` and the mask cropped
    to it; see :func:`segment_lungs`."""
    grid = _Grid.for_volume(spacing)
    body = _body(_downsample(hu > BODY_HU, grid.factors))
    if not bool(body.any()):
        raise UnsupportedInput(f"no body found: no voxel above {BODY_HU:.0f} HU")
    rows, cols = _bounding_box(body, margin=1)
    _, f_rows, f_cols = grid.factors
    full_rows = slice(rows.start * f_rows, min(rows.stop * f_rows, hu.shape[1]))
    full_cols = slice(cols.start * f_cols, min(cols.stop * f_cols, hu.shape[2]))
    inside = body[:, rows, cols]
    air = hu[:, full_rows, full_cols] < AIR_HU

    deep = _erode(inside, dims=(1, 2), radius=grid.pixels(CHEST_WALL_MM))
    air_fraction = _block_fraction(air, grid.factors)
    candidates = (air_fraction > 0.5) & deep
    # Thin walls (trachea against a lung apex) vanish in a majority vote; airway tracking
    # uses blocks that are air throughout, and the airway is then grown back by a pixel.
    all_air = (air_fraction > 0.999) & deep
    airway = _dilate(_trachea(all_air, inside, grid), dims=(1, 2), radius=1) & candidates
    lung_ids = _drop_specks(_find_lungs(candidates & ~airway, inside, grid), grid)

    crops = {}
    for number, (region, mask) in _full_resolution(lung_ids, airway, inside, air, grid).items():
        z, r, c = region
        shifted = (
            z,
            slice(r.start + full_rows.start, r.stop + full_rows.start),
            slice(c.start + full_cols.start, c.stop + full_cols.start),
        )
        crops[number] = (shifted, mask)
    return crops


def segment_lungs(hu: torch.Tensor, spacing: tuple[float, float, float]) -> dict[int, torch.Tensor]:
    """Right (1) and left (2) lung masks of a CT volume in HU, on ``hu``'s device.

    ``hu`` is (slices, rows, columns) in the orientation described in the module
    docstring. After the body mask, the work is cropped to the body's bounding box.
    Raises :class:`UnsupportedInput` when no body or no lung is found.
    """
    masks = {}
    for number, (region, mask) in _lung_crops(hu, spacing).items():
        whole = torch.zeros(hu.shape, dtype=torch.bool, device=hu.device)
        whole[region] = mask
        masks[number] = whole
    return masks


# --- measurements and output -------------------------------------------------------------


def _measure(
    number: int, mask: torch.Tensor, hu: torch.Tensor, voxel_ml: float
) -> list[Measurement]:
    """Volume (mL), mean HU and LAA-950 (%) of one lung."""
    values = hu[mask].double()
    count = values.numel()
    mean_hu = float(values.mean()) if count else math.nan
    laa = 100.0 * float((values < LAA_HU).sum()) / count if count else math.nan
    return [
        Measurement(VOLUME, count * voxel_ml, MILLILITER, segment_number=number),
        Measurement(ATTENUATION, mean_hu, HOUNSFIELD, segment_number=number, derivation=MEAN),
        Measurement(LAA_950, laa, PERCENT, segment_number=number),
    ]


def _segment(number: int, mask: np.ndarray) -> Segment:
    """The coded segment of the right (1) or left (2) lung."""
    right = number == RIGHT_LUNG
    return Segment(
        number=number,
        label="Right lung" if right else "Left lung",
        category=ANATOMICAL_STRUCTURE,
        type=LUNG,
        mask=mask,
        type_modifier=RIGHT if right else LEFT,
        tracking_id="right-lung" if right else "left-lung",
    )


class CtLungModel(Model):
    """Right and left lung segmentation with volume, mean HU and LAA-950 per lung."""

    name = "ct-lung"
    version = "1.0.0"
    intended_use = (
        "Segments the right and left lung on a non-contrast or contrast chest CT of an "
        "adult (standard axial orientation) and measures each lung's volume, mean "
        "attenuation and low attenuation area below -950 HU (LAA-950, an emphysema "
        "index). Classical thresholding and connected components, no trained weights. "
        "For quantitative support only; the result must be reviewed by a radiologist."
    )
    input_spec = InputSpec(
        modalities=("CT",),
        min_slices=10,
        description=(
            "Axial CT series covering the chest, in HU, ImageOrientationPatient "
            "1\\0\\0\\0\\1\\0 (columns toward the patient's left), at least 10 slices."
        ),
    )

    def __init__(self) -> None:
        self._device = torch.device("cpu")

    def load(self, device: str) -> None:
        """Remember the device; there are no weights to load."""
        self._device = torch.device(device)

    def check_input(self, volume: Volume) -> None:
        """Also require the standard axial orientation that the left/right split assumes."""
        super().check_input(volume)
        if not np.allclose(volume.orientation, AXIAL, atol=0.05):
            raise UnsupportedInput(
                "needs axial slices with ImageOrientationPatient 1\\0\\0\\0\\1\\0, got "
                + "\\".join(f"{v:g}" for v in volume.orientation)
            )

    def predict(self, volume: Volume) -> Prediction:
        """Segment both lungs and measure them; see the module docstring."""
        self.check_input(volume)
        if volume.array.ndim != 3 or min(volume.spacing) <= 0:
            raise ModelError(
                f"expected a 3D volume with positive spacing, got shape "
                f"{volume.array.shape} and spacing {volume.spacing}"
            )
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        array = volume.array
        with torch.inference_mode():
            flags = array.flags
            if (
                self._device.type == "cpu"
                and array.dtype == np.float32
                and flags.writeable
                and flags.c_contiguous
            ):
                # Shares the caller's memory (no 300 MB copy for a thin-slice CT); the
                # segmentation only reads ``hu``.
                hu = torch.from_numpy(array)
            else:
                # torch.tensor copies, so a read-only array is fine and is never written to.
                hu = torch.tensor(array, dtype=torch.float32, device=self._device)
            crops = _lung_crops(hu, volume.spacing)
            prediction = Prediction()
            for number, (region, mask) in sorted(crops.items()):
                prediction.measurements.extend(_measure(number, mask, hu[region], voxel_ml))
                whole = np.zeros(array.shape, dtype=np.bool_)
                whole[region] = mask.cpu().numpy()
                prediction.segments.append(_segment(number, whole))
        return prediction
