"""The Guard's words: what it tells the user (event messages, evidence, the give-up diagnosis)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from seismo.events import Event
from seismo.mitigate.guard.window import REASONS

__all__ = ["GUARD_KINDS", "REASON_TEXT", "evidence", "describe", "describe_episode", "skip_event", "reset_event",
           "rollback_event", "gave_up_text", "gave_up_event", "finite_or_str"]

#: Event kinds the Guard writes (public API, like the detectors' ``KINDS``).
GUARD_KINDS = ("guard_skip", "guard_reset", "guard_rollback", "guard_gave_up")
REASON_TEXT = {
    "nonfinite_loss": "non-finite loss",
    "nonfinite_grad": "non-finite gradient",
    "loss_spike": "loss spike",
    "grad_spike": "grad-norm spike",
}
N_FLAGS = len(REASONS)  # per-step row: flags (REASONS order) | loss, grad_norm | their medians | their z-scores

_SKIP_ADVICE = "a lone skipped spike is harmless; repeated ones mean the run is unstable (see seismo diagnose)"
_RESET_ADVICE = "watch the next steps; if the loss follows, lower the learning rate"
_ROLLBACK_ADVICE = "if rollbacks repeat: lower the LR, add qk-layernorm / z-loss, or inspect the skipped data"
_GAVE_UP_ADVICE = "lower the learning rate; see the diagnosis in the GuardGaveUp message"


def finite_or_str(x: Any) -> Any:
    """``x``, or its string for a non-finite float (JSON without NaN)."""
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def reasons_of(row: Sequence[float]) -> list[str]:
    """The reasons flagged in one step's row."""
    return [r for r, f in zip(REASONS, row[:N_FLAGS]) if f > 0]


def evidence(row: Sequence[float]) -> dict[str, Any]:
    """The numbers one step's decision was made on."""
    n = N_FLAGS
    return {"loss": row[n], "grad_norm": row[n + 1], "loss_median": row[n + 2], "grad_norm_median": row[n + 3],
            "loss_z": row[n + 4], "grad_norm_z": row[n + 5]}


def describe(reasons: Sequence[str], row: Sequence[float]) -> str:
    """``"loss spike (loss 8.39 vs window median 3.1, robust z 41)"`` and so on, joined by "and"."""
    e = evidence(row)
    parts = []
    for r in reasons:
        if r == "nonfinite_loss":
            parts.append(f"non-finite loss ({e['loss']})")
        elif r == "nonfinite_grad":
            parts.append(f"non-finite gradient (norm {e['grad_norm']})")
        elif r == "loss_spike":
            parts.append(f"loss spike (loss {e['loss']:.4g} vs window median {e['loss_median']:.4g}, "
                         f"robust z {e['loss_z']:.3g})")
        elif r == "grad_spike":
            parts.append(f"grad-norm spike (norm {e['grad_norm']:.4g} vs window median "
                         f"{e['grad_norm_median']:.4g}, robust z {e['grad_norm_z']:.3g})")
    return " and ".join(parts) or "no spike"


def describe_episode(ep: dict) -> str:
    """Each reason of a spike episode with the numbers of its first flagged step."""
    return " and ".join(describe([r], ep["first"][r]) for r in ep["reasons"])


def skip_event(t: int, d: int, row: Sequence[float]) -> Event:
    reasons = reasons_of(row)
    ev: dict[str, Any] = evidence(row)
    ev.update(data_index=d, reasons=reasons)
    return Event("guard_skip", "warning", t, "", f"skipped step {t} (data index {d}): {describe(reasons, row)}",
                 ev, _SKIP_ADVICE)


def reset_event(t: int, ep: dict, how: str, why: str, warmup: int) -> Event:
    msg = (f"{describe_episode(ep)} from step {ep['start']} (data index {ep['data_index']}) did not recover ({how}); "
           f"{why}: updates go on and the spike window restarts (no detection for {warmup} steps)")
    ev: dict[str, Any] = {k: finite_or_str(v) for k, v in evidence(ep["row"]).items()}
    ev.update(spike_step=ep["start"], spike_data_index=ep["data_index"], detected_step=t, reasons=list(ep["reasons"]),
              skipped_steps=ep["skips"], why=how)
    return Event("guard_reset", "warning", t, "", msg, ev, _RESET_ADVICE)


def rollback_event(t: int, ep: dict, record: dict) -> Event:
    start, end = record["skipped_range"]
    msg = (f"rolled back: {describe_episode(ep)} from step {ep['start']} (data index {ep['data_index']}) did not "
           f"recover ({record['why']}); restored step {record['restored_step']}, skipping data [{start}, {end}) "
           f"({end - start} batches), LR factor {record['lr_factor']:g}")
    ev = {k: v for k, v in record.items() if k != "time"}
    return Event("guard_rollback", "critical", t, "", msg, ev, _ROLLBACK_ADVICE)


def gave_up_text(t: int, d: int, row: Sequence[float], ep: dict, why: str, rollbacks: Sequence[dict]) -> list[str]:
    """The diagnosis of a give-up, line by line: where, why, each rollback, what to do next."""
    lines = [
        f"seismo Guard gave up at step {t} (data index {d}): {describe(reasons_of(row), row)}; the spike "
        f"started at step {ep['start']} (data index {ep['data_index']}) with {describe_episode(ep)}.",
        f"Why: {why}.",
    ]
    for rb in rollbacks:
        lines.append(f"  rollback #{rb['index'] + 1}: {', '.join(REASON_TEXT[x] for x in rb['reasons'])} from step "
                     f"{rb['spike_step']} (data index {rb['spike_data_index']}) -> restored step {rb['restored_step']}, "
                     f"skipped data [{rb['skipped_range'][0]}, {rb['skipped_range'][1]}), LR factor {rb['lr_factor']:g}")
    lines.append(f"Rollbacks: {len(rollbacks)}. Next: lower the learning rate, add qk-layernorm / z-loss, "
                 "inspect the batches at the data indices above, or allow more rollbacks (max_rollbacks).")
    return lines


def gave_up_event(t: int, lines: list[str], ev: dict) -> Event:
    return Event("guard_gave_up", "critical", t, "", lines[0] + " " + lines[1], ev, _GAVE_UP_ADVICE)
