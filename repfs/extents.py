"""Runs of consecutive block numbers: the one helper that turns block numbers into extents.

numpy does the scan (one pass, no Python loop per block); the loop is per run."""

from __future__ import annotations

import numpy as np


def run_bounds(*arrays) -> list[tuple[int, int]]:
    """Index ranges [i, j) over which every one of the (equally long) arrays steps by exactly
    one from each element to the next: one array gives its runs of consecutive numbers; two
    give the runs that are contiguous in both (e.g. in the volume and in a save volume)."""
    n = len(arrays[0])
    if n == 0:
        return []
    step = np.zeros(n - 1, dtype=bool)
    for a in arrays:
        step |= np.diff(np.asarray(a).astype(np.int64)) != 1
    breaks = (np.flatnonzero(step) + 1).tolist()
    return list(zip([0, *breaks], [*breaks, n]))


def runs(values) -> list[tuple[int, int, int]]:
    """Split an array of block numbers into runs of consecutive numbers: (index in `values`,
    first number, length) for each run, in order."""
    return [(i, int(values[i]), j - i) for i, j in run_bounds(values)]


def mapped_runs(phys: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of a block-map slice that are mapped (non-zero) and contiguous on the volume:
    (index in the slice, first volume block, length); holes are skipped."""
    nz = np.flatnonzero(phys)
    if len(nz) == 0:
        return []
    vals = phys[nz].astype(np.int64)
    return [(int(nz[i]), int(vals[i]), j - i) for i, j in run_bounds(nz, vals)]
