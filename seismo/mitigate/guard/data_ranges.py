"""Skipped data ranges: which data index a step trains on after rollbacks jumped over batches."""

from __future__ import annotations

from typing import Sequence

__all__ = ["data_index", "merge_range"]


def data_index(step: int, skipped_ranges: Sequence[Sequence[int]]) -> int:
    """The data index a run trains on at ``step`` when the half-open index ranges
    ``skipped_ranges`` (sorted, disjoint) are jumped over: the step-th index in no range.

    A reference run that "never saw" those batches uses the same function from step 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    idx = step
    for a, b in skipped_ranges:
        if a > idx:
            break
        idx += b - a
    return idx


def merge_range(ranges: list[list[int]], a: int, b: int) -> list[list[int]]:
    """``ranges`` (sorted, disjoint, half-open) with ``[a, b)`` added, merged and sorted."""
    out: list[list[int]] = []
    for lo, hi in sorted([*ranges, [a, b]]):
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out
