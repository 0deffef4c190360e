"""Streaming detectors: signals in, named events out.

Every detector has ``update(step, values) -> list[Event]`` (``values`` maps signal names to
host floats for one step, as the Monitor's listeners receive them), ``state_dict()`` and
``load_state_dict()`` (so detection survives checkpoint/resume), and never looks ahead.
Missing signals are skipped, so a detector simply stays silent when the monitor does not record
what it needs. Papers behind each rule are cited in the class docstrings; the mitigations are
in :mod:`seismo.diagnose.playbook`.
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from seismo.diagnose.loss_scale import LossScaleDropDetector
from seismo.diagnose.regression import LossRegressionDetector
from seismo.diagnose.spikes import SpikeDetector
from seismo.diagnose.stats import TrendFit
from seismo.diagnose.stats import format_value as _fmt
from seismo.diagnose.stats import module_values as _modules
from seismo.events import Event

__all__ = [
    "Detector", "SpikeDetector", "LossRegressionDetector", "GrowthDetector", "NonFiniteDetector", "ThresholdDetector",
    "AdamDecorrelationDetector", "StallDetector", "EdgeOfStabilityDetector", "default_detectors",
]


@runtime_checkable
class Detector(Protocol):
    name: str

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class GrowthDetector:
    """A per-module signal growing towards a failure threshold, with an early warning.

    ``critical`` when |value| reaches ``threshold`` (or, with ``relative``, ``threshold`` times
    the module's early reference: the median of its first ``ref_points`` observations). Before
    that, a log-linear trend over the last ``window`` observations is extrapolated; once the value
    is above ``floor`` of the threshold, the fit is good (r^2 >= ``min_r2``) and the predicted
    crossing is within ``horizon`` steps, a ``warning`` names the predicted step. Growth-type
    instabilities: attention logits (Wortsman 2023 §3.1), output log Z (§3.2), activations
    (Peri-LN, arXiv 2502.02732).
    """

    def __init__(self, kind: str, prefix: str, threshold: float, *, name: str | None = None, relative: bool = False,
                 floor: float = 0.1, horizon: int = 200, window: int = 20, min_points: int = 5, min_r2: float = 0.6,
                 ref_points: int = 10, what: str = ""):
        self.name = name or kind
        self.kind, self.prefix, self.threshold, self.relative = kind, prefix, threshold, relative
        self.floor, self.horizon, self.window, self.min_points, self.min_r2 = floor, horizon, window, min_points, min_r2
        self.ref_points = ref_points
        self.what = what or prefix.rstrip("/")
        self.fits: dict[str, TrendFit] = {}
        self.refs: dict[str, list[float]] = {}
        self.warned: dict[str, bool] = {}
        self.failed: dict[str, bool] = {}

    def _threshold(self, module: str, v: float) -> float | None:
        if not self.relative:
            return self.threshold
        ref = self.refs.setdefault(module, [])
        if len(ref) < self.ref_points:
            ref.append(v)
            return None
        return self.threshold * max(float(np.median(ref)), 1e-12)

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        out: list[Event] = []
        for module, raw in _modules(values, self.prefix):
            if not math.isfinite(raw):
                continue
            v = abs(raw)
            thr = self._threshold(module, v)
            if thr is None:
                continue
            fit = self.fits.setdefault(module, TrendFit(self.window))
            fit.add(step, max(v, 1e-30))
            name = module or self.what
            if v >= thr:
                if not self.failed.get(module):
                    self.failed[module] = True
                    out.append(Event(self.kind, "critical", step, module,
                                     f"{self.what} of {name} reached {_fmt(v)} (threshold {_fmt(thr)})",
                                     dict(value=v, threshold=thr)))
                continue
            if v < thr / 2:
                self.failed[module] = False
            if self.warned.get(module) or len(fit) < self.min_points or v < self.floor * thr:
                continue
            slope, _, r2 = fit.slope_intercept()
            cross = fit.crossing(thr)
            if cross is not None and r2 >= self.min_r2 and cross - step <= self.horizon:
                self.warned[module] = True
                out.append(Event(self.kind, "warning", step, module,
                                 f"{self.what} of {name} is {_fmt(v)} and growing x{math.exp(slope * 100):.3g} per 100 steps: "
                                 f"predicted to reach {_fmt(thr)} around step {int(cross)}",
                                 dict(value=v, threshold=thr, predicted_step=int(cross), growth_per_step=slope, r2=r2)))
        return out

    def state_dict(self) -> dict:
        return {"fits": {m: f.state_dict() for m, f in self.fits.items()}, "refs": self.refs,
                "warned": self.warned, "failed": self.failed}

    def load_state_dict(self, state: dict) -> None:
        self.fits = {}
        for m, s in state["fits"].items():
            f = TrendFit(int(s["window"]))
            f.load_state_dict(s)
            self.fits[m] = f
        self.refs = {m: list(v) for m, v in state["refs"].items()}
        self.warned, self.failed = dict(state["warned"]), dict(state["failed"])


class ThresholdDetector:
    """A per-module (or global) fraction-type signal above a level: warning at ``warn``,
    critical at ``critical``; one event per module and level until it falls below ``warn``."""

    def __init__(self, kind: str, prefix: str, warn: float, critical: float | None = None, *, name: str | None = None,
                 below: bool = False, what: str = "", min_consecutive: int = 1, exclude: tuple[str, ...] = ()):
        self.name = name or kind
        self.kind, self.prefix, self.warn, self.critical, self.below = kind, prefix, warn, critical, below
        self.what = what or prefix.rstrip("/")
        self.min_consecutive = min_consecutive
        self.exclude = exclude
        self.level: dict[str, int] = {}
        self.count: dict[str, int] = {}

    def _beyond(self, v: float, t: float) -> bool:
        return v < t if self.below else v > t

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        out = []
        items = [(m, v) for m, v in _modules(values, self.prefix)] if self.prefix.endswith("/") else (
            [("", values[self.prefix])] if self.prefix in values else [])
        for module, v in items:
            if not math.isfinite(v) or any(e in module for e in self.exclude):
                continue
            lvl = 2 if self.critical is not None and self._beyond(v, self.critical) else (1 if self._beyond(v, self.warn) else 0)
            self.count[module] = self.count.get(module, 0) + 1 if lvl else 0
            if lvl == 0:
                self.level[module] = 0
                continue
            if self.count[module] < self.min_consecutive or lvl <= self.level.get(module, 0):
                continue
            self.level[module] = lvl
            limit = self.critical if lvl == 2 else self.warn
            where = f" in {module}" if module else ""
            out.append(Event(self.kind, "critical" if lvl == 2 else "warning", step, module,
                             f"{self.what}{where} is {_fmt(v)} ({'below' if self.below else 'above'} {_fmt(limit)})",
                             dict(value=v, limit=limit)))
        return out

    def state_dict(self) -> dict:
        return {"level": self.level, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.count = dict(state["level"]), dict(state["count"])


class NonFiniteDetector:
    """NaN or Inf in the loss or the gradients (``grad/nonfinite`` > 0). Critical, once per episode;
    the module is the first (in the model's order) whose gradient norm is not finite."""

    name = "nonfinite"

    def __init__(self):
        self.active = False

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        loss = values.get("loss")
        bad_loss = loss is not None and not math.isfinite(loss)
        count = values.get("grad/nonfinite", 0.0)
        bad_grad = (count is not None and (not math.isfinite(count) or count > 0)) or (
            "grad/norm" in values and not math.isfinite(values["grad/norm"]))
        if not (bad_loss or bad_grad):
            self.active = False
            return []
        if self.active:
            return []
        self.active = True
        modules = [m for m, v in _modules(values, "grad/norm/") if not math.isfinite(v)]
        what = " and ".join(w for w, b in (("the loss", bad_loss), ("gradients", bad_grad)) if b)
        return [Event("nonfinite", "critical", step, modules[0] if modules else "",
                      f"non-finite values in {what}" + (f"; first module with a non-finite gradient: {modules[0]}" if modules else ""),
                      dict(loss=loss, nonfinite_grad_entries=count, modules=modules[:10]))]

    def state_dict(self) -> dict:
        return {"active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.active = bool(state["active"])


class AdamDecorrelationDetector:
    """Adam's update decorrelating from the gradient (Molybog et al. 2023, arXiv 2304.09871):
    the per-module update ratio turns bimodal at +-1 (``adam/ratio_bimodal/<m>`` above
    ``bimodal``) or the update-gradient cosine stays below ``min_cos`` for ``patience``
    observations."""

    name = "adam_decorrelation"

    def __init__(self, bimodal: float = 0.5, min_cos: float = 0.0, patience: int = 3, min_step: int = 100):
        self.bimodal = ThresholdDetector("adam_decorrelation", "adam/ratio_bimodal/", bimodal, 0.9,
                                         what="fraction of Adam update ratios near +-1", min_consecutive=3)
        self.min_cos, self.patience, self.min_step = min_cos, patience, min_step
        self.low = 0

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        if step < self.min_step:  # the first Adam steps have |r| = 1 by construction (m_hat / sqrt(v_hat) at t = 1)
            return []
        out = self.bimodal.update(step, values)
        cos = values.get("adam/update_grad_cos")
        if cos is not None and math.isfinite(cos):
            self.low = self.low + 1 if cos < self.min_cos else 0
            if self.low == self.patience:
                out.append(Event("adam_decorrelation", "warning", step, "",
                                 f"Adam's update has had a cosine below {self.min_cos} with the gradient "
                                 f"for {self.patience} observations ({cos:.3f})",
                                 dict(update_grad_cos=cos)))
        return out

    def state_dict(self) -> dict:
        return {"bimodal": self.bimodal.state_dict(), "low": self.low}

    def load_state_dict(self, state: dict) -> None:
        self.bimodal.load_state_dict(state["bimodal"])
        self.low = int(state["low"])


class EdgeOfStabilityDetector:
    """Sharpness above the stability threshold: lambda_max > 2/lr for GD, or the preconditioned
    sharpness above (2 + 2 beta1) / ((1 - beta1) lr) for Adam (Cohen et al. 2021, arXiv
    2103.00065; 2022, arXiv 2207.14484; Gilmer et al. 2022, arXiv 2110.04369). Early warning when
    the ratio's trend crosses 1 within ``horizon`` steps."""

    name = "edge_of_stability"

    def __init__(self, horizon: int = 500):
        self.growth = GrowthDetector("edge_of_stability", "hessian/ratio", 1.0, floor=0.5, horizon=horizon,
                                     min_points=4, what="sharpness / stability threshold")

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        thr = values.get("hessian/threshold")
        eig = values.get("hessian/max_eig_precond", values.get("hessian/max_eig"))
        if thr is None or eig is None or not (math.isfinite(thr) and math.isfinite(eig)) or thr <= 0:
            return []
        evs = self.growth.update(step, {"hessian/ratio": eig / thr})
        for e in evs:
            e.evidence.update(sharpness=eig, threshold=thr)
        return evs

    def state_dict(self) -> dict:
        return self.growth.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.growth.load_state_dict(state)


class StallDetector:
    """Training stalled: the loss improved by less than ``min_improvement`` (relative) over
    ``window`` observations while the relative update size ``update/norm / param/norm`` stays
    below ``max_update_ratio`` (updates vanished, e.g. the eps regime of Wortsman 2023 §3.5 or a
    learning rate decayed to nothing)."""

    name = "stall"

    def __init__(self, window: int = 200, min_improvement: float = 1e-3, max_update_ratio: float = 1e-5):
        self.window, self.min_improvement, self.max_update_ratio = window, min_improvement, max_update_ratio
        self.losses: list[float] = []
        self.last_ratio = math.nan
        self.fired = False

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        if "update/norm" in values and "param/norm" in values and values["param/norm"] > 0:
            self.last_ratio = values["update/norm"] / values["param/norm"]
        loss = values.get("loss")
        if loss is None or not math.isfinite(loss):
            return []
        self.losses.append(loss)
        self.losses = self.losses[-self.window:]
        if len(self.losses) < self.window or self.fired:
            return []
        a = np.asarray(self.losses)
        first, last = a[: self.window // 4].mean(), a[-self.window // 4:].mean()
        improvement = (first - last) / max(abs(first), 1e-12)
        if improvement < self.min_improvement and self.last_ratio < self.max_update_ratio:
            self.fired = True
            return [Event("stall", "warning", step, "",
                          f"loss improved by {improvement:.2%} over the last {self.window} observations while updates are "
                          f"{self.last_ratio:.2e} of the weights: training has stalled",
                          dict(improvement=improvement, update_ratio=self.last_ratio))]
        return []

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "last_ratio": self.last_ratio, "fired": self.fired}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.last_ratio, self.fired = list(state["losses"]), float(state["last_ratio"]), bool(state["fired"])


def default_detectors() -> list[Detector]:
    """The detectors with their default sensitivities (see docs/DIAGNOSE.md for each rule)."""
    return [
        NonFiniteDetector(),
        SpikeDetector("loss_spike", "loss", z=4.5, rel=0.02, persist=50, divergence_kind="loss_divergence", triage=True,
                      ramp_z=3.0, level_lag=8, outlier_z=3.0, outlier_excess=math.log(2.0)),
        LossRegressionDetector(),
        SpikeDetector("grad_spike", "grad/norm", z=6.0, rel=1.0, log=True, module_prefix="grad/norm/", module_z=6.0,
                      consequence="loss"),
        SpikeDetector("update_spike", "update/norm", z=6.0, rel=1.0, log=True, module_prefix="update/ratio/", module_z=6.0,
                      consequence="loss"),
        GrowthDetector("attention_logit_growth", "attn/logit_max/", 1e3, floor=0.25, what="max attention logit"),
        ThresholdDetector("attention_entropy_collapse", "attn/entropy_min/", 0.1, 0.02, below=True,
                          what="min-over-heads attention entropy (nats)", min_consecutive=3),
        GrowthDetector("output_logit_divergence", "logits/logz_absmax", 50.0, floor=0.3, what="max |log Z| of the output"),
        EdgeOfStabilityDetector(),
        AdamDecorrelationDetector(),
        ThresholdDetector("epsilon_regime", "adam/eps_dominated/", 0.9, what="fraction of Adam coordinates with sqrt(v_hat) < eps",
                          min_consecutive=3, exclude=("wte", "wpe", "embed")),
        ThresholdDetector("softmax_collapse", "logits/softmax_collapse", 0.01, 0.5,
                          what="fraction of output rows in softmax collapse"),
        SpikeDetector("gradient_variance_extreme", "adam/v_max", z=6.0, rel=9.0, log=True, min_history=10),
        GrowthDetector("activation_growth", "act/max/", 1e4, floor=0.1, what="max |activation|"),
        StallDetector(),
        LossScaleDropDetector(),
    ]
