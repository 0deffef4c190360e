"""Spikes: a value far above its own recent level, triaged by what follows it.

:class:`SpikeDetector` serves the loss (``loss_spike``, with triage), the global gradient norm
(``grad_spike``, with module-local spikes) and Adam's update size (``update_spike``).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping

import numpy as np

from seismo._stats import MAD_TO_SIGMA
from seismo.diagnose.stats import RobustWindow, TailModel, median_rows
from seismo.diagnose.stats import format_value as _fmt
from seismo.diagnose.stats import module_values as _modules
from seismo.events import Event

__all__ = ["SpikeDetector"]


class SpikeDetector:
    """A value far above its recent baseline.

    Baseline level: the median of the last ``recent`` accepted values; noise scale: the robust
    (MAD-based) standard deviation of the first differences over the last ``window`` accepted
    values, so a steadily decaying loss does not inflate it. Spike when
    (x - level) / noise exceeds ``z`` *and* x exceeds the level by more than ``rel`` (relative).
    Spikes are kept out of the window (unlike OLMo-core's rolling z-score, which lets them in and
    so widens its own band). With ``log=True`` the statistics are taken on log values (norms are
    multiplicative). An episode lasting ``persist`` observations becomes a ``divergence_kind``
    event (PaLM, arXiv 2204.02311: some spikes recover, some do not).

    Without ``triage`` the event comes at the onset, as a ``warning``. With ``triage`` (the loss)
    the severity comes from the consequence (a heavy-tailed per-step loss has many one-step
    outliers that training shrugs off; PaLM, arXiv 2204.02311, traced its spikes to particular
    batches): the episode's level and noise are frozen at the onset and the episode ends when
    the value is back within ``recover_z`` noise units of that level.

    - back within ``quick`` observations: an ``info`` event (an isolated outlier, no advice),
      emitted at the recovery;
    - still out after ``quick`` observations: a ``warning``, emitted then;
    - still out after ``persist``: the ``critical`` divergence event.

    Every event has ``step`` = the onset and evidence ``peak_excess`` (nats, or log units with
    ``log``), ``peak_excess_noise`` (noise units), ``excess_area`` (sum of the excess over the
    episode so far) and ``steps_to_recover`` (None while it has not recovered).

    With ``ramp_z``, a spike that builds over a few steps counts too: the last three observations
    (accepted or not) all ``ramp_z`` noise units above the level. With ``level_lag`` the level is
    taken ``level_lag`` accepted values back, so such a spike does not drag its baseline up.

    With ``triage`` and ``tail_rate`` (default 1e-5: one per 100,000 steps) the warning threshold
    is the run's own. At each onset the detector takes the robust residuals of its window
    ((value - its level then) / the noise scale), sums them over every ``quick + 1`` consecutive
    observations (the span a warning is decided on, so their serial correlation counts), adds the
    sums to a :class:`~seismo.diagnose.stats.TailModel` (the last 4,096), fits a generalized Pareto
    distribution to the top 10 % (peaks over threshold; Pickands 1975, Coles 2001) and takes
    ``tail_area``, the sum exceeded with probability ``tail_rate``. An episode still out after
    ``quick`` observations becomes a ``warning`` only if its excess area so far (noise units)
    exceeds ``tail_area``; otherwise it is reported as ``info`` when it recovers (or ``critical``
    after ``persist``). So on a healthy run whose residuals follow that tail, warning episodes
    come at most ``tail_rate`` per observation, while every onset above ``z`` is still reported.

    With ``triage`` and ``outlier_z`` a *material outlier* opens an episode too: an observation
    above the recovery band (``outlier_z`` noise units; the loss: 3, = ``recover_z``) whose excess
    is more than ``outlier_excess`` in the signal's units (the loss: ln 2 = 0.69 nats, the batch's
    perplexity twice the level's) and ``rel`` relative. On a noisy run (one small batch per step) a
    large single-step spike stands only 4-5 noise units above the level, and the window's level
    and noise estimates move its z-score by more than one unit, so the ``z`` onset misses some;
    this one caught all of them on the healthy-runs set (docs/DIAGNOSE.md). Such an episode is
    triaged like any other (so nearly always an ``info`` outlier: a warning needs the tail-gated
    excess area above) and costs no alarm; the nats floor keeps it silent on runs whose noise is
    small against ln 2 (there every such excursion is far above ``z``).

    With ``module_prefix`` (e.g. ``grad/norm/``) the module whose own signal jumped most is named
    as responsible, and with ``module_z`` a module whose own signal jumps ``module_z`` noise units
    and ``module_ratio`` times above its own recent level is reported even when the global signal
    hardly moves (a x100 gradient in one small module moves the global norm little). A module
    level that stays flagged for ``persist`` observations enters the module's window (its new
    normal, as for the global signal), so one shifted module does not stay flagged for good.

    With ``consequence`` (a signal name: ``grad_spike`` and ``update_spike`` use ``"loss"``) the
    severity of a spike (global or module-local) comes from what that signal does next: Adam
    normalises the update, so a gradient-norm spike often leaves no trace in the loss (SPAM, Huang
    2025, arXiv 2501.06842, clips such spikes because some do harm; Molybog 2023, arXiv 2304.09871,
    because update spikes come before loss spikes). At the onset an ``info`` event is reported
    (``provisional=True`` in its evidence); the consequence signal's level and noise (median of its
    last ``recent`` values, robust noise of its first differences over ``window``, as the loss-spike
    rule) are frozen then. An episode belongs to the global signal or to one module (so a spike in
    another module is an episode of its own); spikes of the same signal that come back within
    ``consequence_steps`` observations of its last one belong to it. One final event per episode,
    ``step`` = the onset:

    - ``critical`` if the consequence signal or this signal turns non-finite during the episode;
    - ``warning`` as soon as the mean of the last ``consequence_steps`` consequence values since
      the onset stands ``consequence_z`` noise units above the frozen level (the loss rose), or the
      episode has ``persist`` spiking observations (it persists or keeps coming back);
    - ``info`` ("a spike the loss absorbed") when ``consequence_steps`` consequence values after the
      last spiking observation have passed without either.

    Where the consequence signal is not recorded (or has fewer than ``min_history`` values at the
    onset) the spike is a ``warning`` at the onset, as without ``consequence``.
    """

    def __init__(self, kind: str, signal: str, *, name: str | None = None, window: int = 128, recent: int = 16,
                 z: float = 6.0, rel: float = 0.05, log: bool = False, min_history: int = 20, persist: int = 50,
                 divergence_kind: str | None = None, module_prefix: str | None = None, noise_floor_rel: float = 1e-3,
                 triage: bool = False, quick: int = 5, recover_z: float = 3.0,
                 module_z: float | None = None, module_ratio: float = 5.0, ramp_z: float | None = None, level_lag: int = 0,
                 tail_rate: float | None = 1e-5, outlier_z: float | None = None, outlier_excess: float = math.log(2.0),
                 consequence: str | None = None, consequence_steps: int = 5, consequence_z: float = 2.0):
        self.name = name or kind
        self.kind, self.signal = kind, signal
        self.z, self.rel, self.log, self.min_history, self.persist = z, rel, log, min_history, persist
        self.recent, self.noise_floor_rel = recent, noise_floor_rel
        self.divergence_kind = divergence_kind
        self.module_prefix = module_prefix
        self.triage, self.quick, self.recover_z = triage, quick, recover_z
        self.module_z, self.module_ratio = module_z, module_ratio
        self.ramp_z, self.level_lag = ramp_z, level_lag
        if tail_rate is not None and not 0.0 < tail_rate < 1.0:
            raise ValueError(f"tail_rate: must be in (0, 1), got {tail_rate!r}")
        self.tail_rate = tail_rate if triage else None
        if outlier_z is not None and not (math.isfinite(outlier_z) and outlier_z > 0 and math.isfinite(outlier_excess)):
            raise ValueError(f"outlier_z, outlier_excess: must be finite, outlier_z > 0, got {outlier_z!r}, {outlier_excess!r}")
        # the lower onset only where the consequence decides the severity (without triage every onset warns)
        self.outlier_z = outlier_z if triage else None
        self.outlier_excess = outlier_excess
        self.tail = TailModel()
        self.last3: deque[float] = deque(maxlen=3)  # the last three observations (accepted or not)
        self.window = RobustWindow(window)
        self.module_windows: dict[str, RobustWindow] = {}
        self.module_in_spike: dict[str, int] = {}
        self.in_spike = 0
        self.episode: dict | None = None  # triage: the open episode's frozen statistics and running evidence
        if consequence is not None and not (consequence_steps >= 1 and math.isfinite(consequence_z)):
            raise ValueError(f"consequence_steps, consequence_z: must be >= 1 and finite, got {consequence_steps!r}, {consequence_z!r}")
        self.consequence, self.consequence_steps, self.consequence_z = consequence, consequence_steps, consequence_z
        self.cwindow = RobustWindow(window)  # the consequence signal's own history
        self.cepisodes: dict[str, dict] = {}  # consequence triage: open episodes, "" (global) or by module

    def _t(self, x: float) -> float:
        if not self.log:
            return x
        return math.log(x) if x > 0 else -math.inf

    def _scale(self, level: float, noise: float) -> float:
        floor = self.noise_floor_rel if self.log else self.noise_floor_rel * max(abs(level), 1e-12)
        return max(noise, floor, 1e-12)

    def update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        if self.consequence is None:
            return self._update(step, values)
        return self._consequence_update(step, values)

    def _update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        x = values.get(self.signal)
        if x is None or not math.isfinite(x):
            return []
        tx = self._t(x)
        self.last3.append(tx)
        if self.triage and self.episode is not None:
            return self._continue_episode(step, x, tx)
        out: list[Event] = []
        spike = False
        if len(self.window) >= self.min_history:
            level, noise = self.window.level_and_noise(self.recent, self.level_lag)
            scale = self._scale(level, noise)
            zscore = (tx - level) / scale
            raw_level = math.exp(level) if self.log else level
            rel = (x - raw_level) / max(abs(raw_level), 1e-12)
            spike = zscore > self.z and rel > self.rel
            if not spike and self.outlier_z is not None:
                spike = zscore > self.outlier_z and tx - level > self.outlier_excess and rel > self.rel
            if not spike and self.ramp_z is not None and len(self.last3) == 3:
                spike = self._ramp(level, scale)
        if spike and self.triage:
            self.episode = dict(onset=step, level=level, scale=scale, raw_level=raw_level, peak=x, peak_z=zscore,
                                area=tx - level, n=1, warned=False, tail_area=self._tail_area(scale))
            self.in_spike = 1
            return []
        if spike:
            self.in_spike += 1
            if self.in_spike == 1:
                module, mz = self._responsible(values)
                ratio = x / raw_level if raw_level else math.inf
                ev = dict(value=x, baseline=raw_level, zscore=zscore, ratio=ratio, window=len(self.window))
                if module:
                    ev["module_zscore"] = mz
                out.append(Event(self.kind, "warning", step, module,
                                 f"{self.signal} jumped to {_fmt(x)} ({_fmt(ratio)}x its recent level {_fmt(raw_level)}, "
                                 f"robust z {zscore:.1f})"
                                 + (f"; largest jump in {module}" if module else ""), ev))
            elif self.in_spike == self.persist and self.divergence_kind:
                out.append(self._divergence(step, x, raw_level))
            if self.in_spike >= self.persist:
                # A level that persists is the new normal: let it into the window so later spikes
                # on top of it are still found (otherwise one level shift blinds the detector).
                self.window.add(tx)
        else:
            self.in_spike = 0
            self.window.add(tx)
        if self.module_prefix:
            local = self._module_spikes(step, values)
            if local and not out:
                out.append(local)
        return out

    def _consequence_update(self, step: int, values: Mapping[str, float]) -> list[Event]:
        """The spike rules, then each open episode's verdict from the consequence signal (class docstring)."""
        c = values.get(self.consequence or "")
        x = values.get(self.signal)
        onsets = self._update(step, values)
        out: list[Event] = []
        for key, ep in list(self.cepisodes.items()):  # the open episodes (global, or one per module), oldest first
            # only observations of the signal count (module norms come with it): a step that recorded the loss alone
            # neither extends an episode nor counts towards ``persist``
            spiking = x is not None and math.isfinite(x) and (self.module_in_spike.get(key, 0) > 0 if key else self.in_spike > 0)
            if spiking:
                ep["flags"] += 1
                ep["last_flag"] = step
            out += self._consequence_verdict(step, key, ep, c, x)
        for onset in onsets:
            key = onset.module if onset.evidence.get("scope") == "module" else ""
            if key in self.cepisodes:
                continue  # it comes back within its open episode: counted above
            if c is None or len(self.cwindow) < self.min_history:
                out.append(onset)  # no consequence to judge by: a warning at the onset, as without ``consequence``
                continue
            level, noise = self.cwindow.level_and_noise(self.recent)
            scale = max(noise, self.noise_floor_rel * max(abs(level), 1e-12), 1e-12)
            ep = self.cepisodes[key] = dict(onset=step, last_flag=step, flags=1, level=level, scale=scale, after=[],
                                            module=onset.module, message=onset.message, evidence=dict(onset.evidence))
            out.append(Event(self.kind, "info", step, onset.module, onset.message + f"; severity pending on {self.consequence}",
                             dict(onset.evidence, provisional=True)))
            if not math.isfinite(c):
                out += self._consequence_verdict(step, key, ep, c, None)
        if c is not None and math.isfinite(c):
            self.cwindow.add(c)
        return out

    def _consequence_verdict(self, step: int, key: str, ep: dict, c: float | None, x: float | None) -> list[Event]:
        """The final event of an open consequence episode, if this step decides it (else [])."""
        k = self.consequence_steps
        if (c is not None and not math.isfinite(c)) or (x is not None and not math.isfinite(x)):
            bad = self.consequence if c is not None and not math.isfinite(c) else self.signal
            return self._consequence_event(key, ep, "critical", f"then {bad} turned non-finite (step {step})")
        if c is not None:
            ep["after"].append((c - ep["level"]) / ep["scale"])
        tail = ep["after"][-k:]
        mean = sum(tail) / len(tail) if tail else 0.0
        if len(tail) == k and mean > self.consequence_z:
            return self._consequence_event(key, ep, "warning", f"then {self.consequence} rose (+{mean:.1f} noise units, "
                                           f"mean of {k} observations)")
        if ep["flags"] >= self.persist:
            return self._consequence_event(key, ep, "warning", f"it persisted ({ep['flags']} spiking observations)")
        if c is not None and step - ep["last_flag"] >= k and len(ep["after"]) >= k:
            return self._consequence_event(key, ep, "info", f"{self.consequence} absorbed it (mean of the last {k} "
                                           f"within {self.consequence_z:g} noise units)")
        return []

    def _consequence_event(self, key: str, ep: dict, severity: str, why: str) -> list[Event]:
        del self.cepisodes[key]
        tail = ep["after"][-self.consequence_steps:]
        ev = dict(ep["evidence"], consequence=self.consequence, consequence_level=ep["level"], consequence_noise=ep["scale"],
                  consequence_mean_z=sum(tail) / len(tail) if tail else None, spiking_observations=ep["flags"],
                  observations_after=len(ep["after"]))
        return [Event(self.kind, severity, ep["onset"], ep["module"], f"{ep['message']}; {why}", ev)]

    def _tail_area(self, scale: float) -> float:
        """The warning threshold from the run's own residual tail: add the sums of ``quick + 1``
        consecutive window residuals (noise units) to the tail model and return the sum exceeded
        with probability ``tail_rate`` (0 without a tail model or with too little history)."""
        a = np.fromiter(self.window.values, dtype=np.float64)
        k, m = self.recent + self.level_lag, self.quick + 1
        if len(a) >= k + m:
            levels = median_rows(np.lib.stride_tricks.sliding_window_view(a, self.recent))[: len(a) - k]
            r = (a[k:] - levels) / scale
            self.tail.add_many(np.lib.stride_tricks.sliding_window_view(r, m).sum(axis=1))
        q = self.tail.quantile(self.tail_rate) if self.tail_rate is not None else None
        return 0.0 if q is None else q

    def _ramp(self, level: float, scale: float) -> bool:
        """A spike that builds over a few steps: each of the last three observations is ``ramp_z``
        noise units and ``rel`` above the level (the smallest of them decides, so one outlier among
        them cannot trigger it)."""
        m = min(self.last3[0], self.last3[1], self.last3[2])
        return (m - level) / scale > self.ramp_z and (m - level) / max(abs(level), 1e-12) > self.rel

    def _divergence(self, step: int, x: float, raw_level: float) -> Event:
        return Event(self.divergence_kind or self.kind, "critical", step, "",
                     f"{self.signal} has stayed far above its baseline {_fmt(raw_level)} for {self.persist} observations: "
                     "not a transient spike", dict(value=x, baseline=raw_level, observations=self.persist))

    def _continue_episode(self, step: int, x: float, tx: float) -> list[Event]:
        ep = self.episode
        assert ep is not None
        excess = tx - ep["level"]
        if excess / ep["scale"] <= self.recover_z:
            self.episode, self.in_spike = None, 0
            self.window.add(tx)
            if ep["warned"]:
                return []
            return [self._triage_event(ep, "info", step - ep["onset"])]
        ep["n"] += 1
        self.in_spike = ep["n"]
        ep["area"] += excess
        if x > ep["peak"]:
            ep["peak"], ep["peak_z"] = x, excess / ep["scale"]
        out: list[Event] = []
        if ep["n"] == self.quick + 1 and ep["area"] / ep["scale"] > ep.get("tail_area", 0.0):
            ep["warned"] = True
            out.append(self._triage_event(ep, "warning", None))
        if ep["n"] == self.persist and self.divergence_kind:
            out.append(self._divergence(step, x, ep["raw_level"]))
        if ep["n"] >= self.persist:
            self.window.add(tx)
        return out

    def _triage_event(self, ep: dict, severity: str, steps_to_recover: int | None) -> Event:
        peak_excess = ep["peak"] - ep["raw_level"] if not self.log else self._t(ep["peak"]) - ep["level"]
        ratio = ep["peak"] / ep["raw_level"] if ep["raw_level"] else math.inf
        ev = dict(value=ep["peak"], baseline=ep["raw_level"], zscore=ep["peak_z"], ratio=ratio,
                  peak_excess=peak_excess, peak_excess_noise=ep["peak_z"], excess_area=ep["area"],
                  steps_to_recover=steps_to_recover, observations=ep["n"], window=len(self.window))
        if severity == "info":
            what = (f"isolated outlier: {self.signal} jumped to {_fmt(ep['peak'])} (+{_fmt(peak_excess)} over its level "
                    f"{_fmt(ep['raw_level'])}, {ep['peak_z']:.1f} noise units) and was back after {steps_to_recover} steps")
        else:
            what = (f"{self.signal} jumped to {_fmt(ep['peak'])} (+{_fmt(peak_excess)} over its level {_fmt(ep['raw_level'])}, "
                    f"{ep['peak_z']:.1f} noise units) and has not recovered after {ep['n']} observations")
        return Event(self.kind, severity, ep["onset"], "", what, ev)

    def _module_spikes(self, step: int, values: Mapping[str, float]) -> Event | None:
        """Learn every module's own history; with ``module_z``, report the module that jumped most
        against its own history (one event per module episode)."""
        best: tuple[float, str, float, float] | None = None
        for m, v in _modules(values, self.module_prefix or ""):
            if not (math.isfinite(v) and v > 0):
                continue
            w = self.module_windows.setdefault(m, RobustWindow(self.window.size))
            lv = math.log(v)
            flagged = False
            if self.module_z is not None and len(w) >= self.min_history:
                level, noise = w.level_and_noise(self.recent)
                zm = (lv - level) / max(noise, 0.05)  # at least a 5% log-scale floor
                flagged = zm > self.module_z and lv - level > math.log(self.module_ratio)
                if flagged:
                    n = self.module_in_spike.get(m, 0) + 1
                    self.module_in_spike[m] = n
                    if n == 1 and (best is None or zm > best[0]):
                        best = (zm, m, v, math.exp(level))
                    if n >= self.persist:  # a module level that persists is its new normal (as the global rule)
                        w.add(lv)
            if not flagged:
                self.module_in_spike[m] = 0
                w.add(lv)
        if best is None:
            return None
        zm, m, v, base = best
        return Event(self.kind, "warning", step, m,
                     f"{self.module_prefix}{m} jumped to {_fmt(v)} ({_fmt(v / base)}x its own recent level {_fmt(base)}, "
                     f"robust z {zm:.1f}) while {self.signal} moved less", dict(value=v, baseline=base, zscore=zm, ratio=v / base,
                                                                              scope="module", module_zscore=zm))

    def _responsible(self, values: Mapping[str, float]) -> tuple[str, float]:
        if not self.module_prefix:
            return "", 0.0
        best, best_z = "", -math.inf
        for m, v in _modules(values, self.module_prefix):
            w = self.module_windows.get(m)
            if w is None or len(w) < 4 or not (math.isfinite(v) and v > 0):
                continue
            med, mad = w.median_mad()
            z = (math.log(v) - med) / max(MAD_TO_SIGMA * mad, 0.05)  # at least a 5% log-scale floor
            if z > best_z:
                best, best_z = m, z
        return best, best_z

    def state_dict(self) -> dict:
        return {"window": self.window.state_dict(), "in_spike": self.in_spike, "episode": dict(self.episode) if self.episode else None,
                "modules": {m: w.state_dict() for m, w in self.module_windows.items()},
                "module_in_spike": dict(self.module_in_spike), "last3": list(self.last3), "tail": self.tail.state_dict(),
                "cwindow": self.cwindow.state_dict(),
                "cepisodes": {k: dict(ep, after=list(ep["after"])) for k, ep in self.cepisodes.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state["window"])
        self.in_spike = int(state["in_spike"])
        self.episode = dict(state["episode"]) if state.get("episode") else None
        self.module_windows = {}
        for m, s in state.get("modules", {}).items():
            w = RobustWindow(int(s["size"]))
            w.load_state_dict(s)
            self.module_windows[m] = w
        self.module_in_spike = {m: int(n) for m, n in state.get("module_in_spike", {}).items()}
        self.last3 = deque(state.get("last3", []), maxlen=3)
        if "tail" in state:
            self.tail.load_state_dict(state["tail"])
        if "cwindow" in state:
            self.cwindow.load_state_dict(state["cwindow"])
        self.cepisodes = {k: dict(ep, after=list(ep["after"]), evidence=dict(ep["evidence"]))
                          for k, ep in state.get("cepisodes", {}).items()}
