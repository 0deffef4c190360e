"""Draw the PolyPythia loss curves the labels in ``bench/labels/pythia.csv`` were read from.

    python bench/pythia_plots.py [--data ../shared/data/pythia] [--out bench/.cache/pythia_plots]

Per run, one PNG with four panels (steps 0-5k, 5k-40k, 40k-90k, 90k-end): the per-step loss and
its 101-step moving average; and one PNG zoomed on steps 800-2,200 of every run (the end of the
learning-rate warm-up, where the sharp spikes are). The labels were read by eye from these
plots; a spike's onset was then set to the first step within +-60 of the eye estimate whose
excess over a 61-step running median reaches half the spike's peak (``--refine`` prints them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pythia_data import DEFAULT_DATA, load_loss, runs  # noqa: E402


def _panels(name: str, steps: np.ndarray, loss: np.ndarray, out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(18, 14))
    axs = fig.subplots(4, 1)
    for ax, (lo, hi) in zip(axs, [(0, 5000), (5000, 40000), (40000, 90000), (90000, len(loss))]):
        s = slice(lo, hi)
        ax.plot(steps[s], loss[s], lw=0.3)
        k = 101
        if hi - lo > 3 * k:
            m = np.convolve(loss[s], np.ones(k) / k, mode="same")
            ax.plot(steps[s][k:-k], m[k:-k], lw=1, color="r")
            ax.set_ylim(np.percentile(loss[s], 0.5) - 0.1, np.percentile(loss[s], 99.9) + 0.3)
        ax.grid(True)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=60)


def _zoom(data: Path, out: Path, lo: int = 800, hi: int = 2200) -> None:
    from matplotlib.figure import Figure

    names = runs(data)
    fig = Figure(figsize=(18, 3.2 * len(names)))
    for ax, name in zip(fig.subplots(len(names), 1), names):
        steps, loss = load_loss(data, name)
        ax.plot(steps[lo:hi], loss[lo:hi], lw=0.6)
        ax.set_title(name)
        ax.grid(True)
    fig.tight_layout()
    fig.savefig(out / f"zoom_{lo}_{hi}.png", dpi=55)


def refine(loss: np.ndarray, eye: int, half_width: int = 60) -> int:
    """The first step within +-half_width of ``eye`` whose excess over a 61-step running median
    reaches half of the largest excess there."""
    lo, hi = eye - half_width, eye + half_width
    seg = loss[lo - 100: hi + 100]
    base = np.median(np.lib.stride_tricks.sliding_window_view(seg, 61), axis=1)[70: 70 + (hi - lo)]
    ex = loss[lo:hi] - base
    return lo + int(np.flatnonzero(ex >= ex.max() / 2)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".cache" / "pythia_plots")
    ap.add_argument("--refine", nargs=2, metavar=("RUN", "STEP"), help="print the refined onset of a spike seen near STEP")
    args = ap.parse_args()
    if args.refine:
        print(refine(load_loss(args.data, args.refine[0])[1], int(args.refine[1])))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name in runs(args.data):
        _panels(name, *load_loss(args.data, name), args.out)
    _zoom(args.data, args.out)
    print(f"plots in {args.out}")


if __name__ == "__main__":
    main()
