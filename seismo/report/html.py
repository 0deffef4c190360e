"""One self-contained HTML report of one or more runs, or of a sweep, read from the run store.

The page works offline and asks for nothing: figures are inline SVG (heatmaps embed their pixels
as ``data:`` PNG), the CSS is inline, there is no script, and a Content-Security-Policy
(``default-src 'none'; style-src 'unsafe-inline'; img-src data:``) forbids the browser any
request. Every string that comes from the user (run, module and intervention names, config
values, event messages) goes through :func:`html.escape`. A section whose signals were not
recorded is replaced by a one-line note.

Entry point: :func:`write_report` (``seismo report`` and ``make demo`` call it).
"""

from __future__ import annotations

import html
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from seismo._io import atomic_write_text, dumps_json
from seismo.diagnose import Diagnosis, default_detectors, diagnose_run
from seismo.errors import ConfigError
from seismo.report import run_figures as rf
from seismo.report.figures import figure_svg
from seismo.report.sweep_plots import (
    accuracy_figure,
    attn_logit_vs_size_figure,
    loss_vs_lr_figure,
    sensitivity_vs_size_figure,
    sharpness_trials_figure,
)
from seismo.report.sweep_report import SweepTable, divergence_map, load_sweep, predict_attn_logits, sweep_names
from seismo.store import RunData, RunStore, StoreError, load_run

__all__ = ["write_report", "render_runs", "render_sweep", "CSP", "MAX_EVENT_ROWS"]

logger = logging.getLogger(__name__)

#: The page's Content-Security-Policy: no request of any kind, inline styles and data: images only.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

#: Events listed in the timeline table per run (all of them are drawn in the timeline figure).
MAX_EVENT_ROWS = 200

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #1d232a; background: #fff; }
h1 { font-size: 22px; margin: 24px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 1px solid #dde2e7; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.sub { color: #5b6670; margin: 0 0 12px; }
.note { color: #6b7680; font-style: italic; }
.card { border: 1px solid #dde2e7; border-left: 5px solid #2f7d32; border-radius: 4px; padding: 10px 14px; margin: 10px 0; }
.card.warning { border-left-color: #d08a00; } .card.critical { border-left-color: #c62828; }
.fig svg { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #dde2e7; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: 8px 10px; overflow-x: auto; font-size: 12px; max-height: 420px; }
code { font-size: 12px; } .sev-critical { color: #c62828; font-weight: 600; } .sev-warning { color: #a86a00; }
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if not np.isfinite(v):
        return "n/a" if np.isnan(v) else str(v)
    return f"{v:.{digits}g}" if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3) else f"{v:.{digits + 1}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    """A table from already-escaped cells."""
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(row, numeric)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class _Section:
    anchor: str
    title: str
    body: str


def _figure_section(anchor: str, title: str, build: Callable[[], Any], missing: str, caption: str = "") -> _Section:
    """A section holding one figure, or the one-line note ``missing`` when there is nothing to draw.

    A figure that fails to draw costs its section, not the report: the section says why and the
    failure is logged."""
    try:
        fig = build()
        svg = None if fig is None else figure_svg(fig)
    except Exception as exc:  # noqa: BLE001 - one odd series must not lose the whole report; shown and logged
        logger.warning("seismo report: section %r not drawn: %s: %s", title, type(exc).__name__, exc)
        return _Section(anchor, title, f'<p class="note">This section could not be drawn: {_e(type(exc).__name__)}: {_e(exc)}</p>')
    if svg is None:
        return _Section(anchor, title, f'<p class="note">{_e(missing)}</p>')
    cap = f'<p class="sub">{_e(caption)}</p>' if caption else ""
    return _Section(anchor, title, f'{cap}<div class="fig">{svg}</div>')


def _page(title: str, subtitle: str, sections: Sequence[_Section]) -> str:
    nav = " · ".join(f'<a href="#{s.anchor}">{_e(s.title)}</a>' for s in sections)
    body = "\n".join(f'<section id="{s.anchor}"><h2>{_e(s.title)}</h2>\n{s.body}\n</section>' for s in sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p class=\"sub\">{subtitle} · written by seismo {stamp}</p>\n<p>{nav}</p>\n{body}\n</body></html>\n"
    )


# --- runs ---------------------------------------------------------------------------------

def _labels(datas: Sequence[RunData]) -> list[str]:
    names = [d.info.name for d in datas]
    return [n if names.count(n) == 1 else f"{n} (id {d.info.run_id})" for n, d in zip(names, datas)]


def _diagnosis_card(label: str, d: Diagnosis) -> str:
    if d.cause_kind is None:
        return f'<div class="card"><h3>{_e(label)}</h3><p><b>No instability detected</b> ({len(d.events)} events).</p></div>'
    first = next((e for e in d.events if e.kind == d.cause_kind), None)
    severity = "critical" if any(e.severity == "critical" for e in d.events) else "warning"
    parts = [f'<div class="card {severity}"><h3>{_e(label)}</h3>', f"<p><b>Likely cause:</b> {_e(d.cause)}.</p>"]
    if first is not None:
        where = f" in <code>{_e(first.module)}</code>" if first.module else ""
        parts.append(f"<p><b>Evidence</b> (first {_e(first.kind)} event, step {first.step}{where}): {_e(first.message)}</p>")
        if first.evidence:
            parts.append(_table(["evidence", "value"], [[_e(k), _num(v, 4)] for k, v in first.evidence.items()], [False, True]))
    if d.recommendations:
        top = d.recommendations[0]
        call = f" (<code>{_e(top['call'])}</code>)" if top.get("call") else ""
        parts.append(f"<p><b>Recommended fix:</b> {_e(top['name'])}: {_e(top['how'])}{call}. <i>{_e(top['paper'])}</i></p>")
        if len(d.recommendations) > 1:
            parts.append("<p>Then, in order:</p>" + _table(
                ["for", "change", "how", "seismo", "evidence"],
                [[_e(r["for"]), _e(r["name"]), _e(r["how"]), f"<code>{_e(r['call'])}</code>" if r.get("call") else "",
                  _e(r["paper"])] for r in d.recommendations[1:6]]))
    if d.modules:
        mods = ", ".join(f"<code>{_e(m)}</code> ({n})" for m, n in list(d.modules.items())[:8])
        parts.append(f"<p><b>Modules involved</b> (events): {mods}</p>")
    parts.append("</div>")
    return "".join(parts)


def _events_table(label: str, events: list[dict]) -> str:
    if not events:
        return f'<p class="note">{_e(label)}: no events.</p>'
    rows = []
    for ev in events[:MAX_EVENT_ROWS]:
        sev = ev.get("severity") or "warning"
        rows.append([str(ev.get("step")), f'<span class="sev-{_e(sev)}">{_e(sev)}</span>', _e(ev["kind"]),
                     f"<code>{_e(ev.get('module') or '-')}</code>", _e(ev.get("message") or ""), _e(ev.get("advice") or "")])
    more = f'<p class="note">{len(events) - MAX_EVENT_ROWS} more events not listed.</p>' if len(events) > MAX_EVENT_ROWS else ""
    return f"<h3>{_e(label)}</h3>" + _table(["step", "severity", "kind", "module", "message", "advice"], rows) + more


def _config_block(label: str, data: RunData, store_path: Path) -> str:
    info = data.info
    facts = _table(["run", "id", "status", "created", "store"],
                   [[_e(info.name), str(info.run_id), _e(info.status), _e(info.created_at), _e(store_path)]])
    config, meta = (_e(dumps_json(x, indent=2, sort_keys=True)) for x in (info.config, info.meta))
    return (f"<h3>{_e(label)}</h3>{facts}<details open><summary>config</summary><pre>{config}</pre></details>"
            f"<details><summary>environment and results (meta)</summary><pre>{meta}</pre></details>")


def _diagnose(store_path: Path, data: RunData) -> Diagnosis:
    """Events stored during the run when there are any (what the user saw live); otherwise the
    stored signals replayed through the detectors, as ``seismo diagnose`` does."""
    return diagnose_run(str(store_path), data.info.run_id, replay=not data.events)


def _autopsies(store_path: Path, data: RunData) -> list[dict]:
    """The autopsies of ``data``'s run stored by ``seismo autopsy``: summary runs named
    ``<run>/autopsy@<step>`` whose meta holds the verdict and the replay table."""
    prefix = f"{data.info.name}/autopsy@"
    with RunStore(store_path) as store:
        infos = store.runs()
    return [info.meta["autopsy"] for info in infos
            if info.name.startswith(prefix) and "/" not in info.name[len(prefix):] and isinstance(info.meta.get("autopsy"), dict)]


def _autopsy_block(label: str, verdict: dict) -> str:
    """One autopsy: the verdict sentence and the table of replays (every cell escaped)."""
    rows = [[_e(r.get("name")), _e(r.get("effect")), _num(r.get("peak_loss")), _e(r.get("peak_step", "n/a")),
             _e(r.get("steps_to_recover") if r.get("steps_to_recover") is not None else "n/a"), _num(r.get("final_loss")),
             _e(", ".join(r.get("moved") or []) or "-")] for r in verdict.get("rows", [])]
    table = _table(["replay", "effect", "peak loss", "peak step", "steps to recover", "final loss", "signals that moved"], rows,
                   [False, False, True, True, True, True, False])
    head = (f"<p><strong>{_e(label)}</strong>, spike at step {_e(verdict.get('spike'))} (replayed from step "
            f"{_e(verdict.get('start'))}): cause <strong>{_e(verdict.get('cause'))}</strong>. {_e(verdict.get('sentence'))}</p>")
    return head + table


def render_runs(store_path: str | os.PathLike, runs: Sequence[str | int]) -> str:
    """The HTML report of ``runs`` (ids or names) of the store at ``store_path``, overlaid."""
    store_path = Path(store_path)
    datas = [load_run(store_path, ref) for ref in runs]
    labels = _labels(datas)
    diagnoses = [_diagnose(store_path, d) for d in datas]
    # the events shown are the diagnosis's (stored, or replayed when none were stored)
    shown = [RunData(d.info, d.metrics, d.events or [e.to_dict() for e in g.events]) for d, g in zip(datas, diagnoses)]
    pairs = list(zip(labels, shown))
    figures = [  # (anchor, title, figure builder, note when missing, caption)
        ("loss", "Loss and gradient norm", lambda: rf.loss_figure(pairs), "No loss or grad/norm recorded: section omitted.",
         "Markers: events (v warning, X critical, o info). Validation loss dashed."),
        ("attn-logit", "Attention max logit per layer",
         lambda: rf.heatmap_figure(pairs, "attn/logit_max/", "max attention logit", log=True),
         "No attention logits recorded (attn/logit_max/*): section omitted.",
         "Unbounded growth saturates softmax attention (Wortsman et al. 2023, arXiv 2309.14322 §3.1)."),
        ("attn-entropy", "Attention min entropy per layer",
         lambda: rf.heatmap_figure(pairs, "attn/entropy_min/", "min attention entropy (nats)"),
         "No attention entropy recorded (attn/entropy_min/*): section omitted.",
         "Minimum over heads of the mean entropy; collapse toward 0 is entropy collapse (Zhai et al. 2023, arXiv 2303.06296)."),
        ("logz", "Output log Z", lambda: rf.logz_figure(pairs), "No output log Z recorded (logits/logz_*): section omitted.",
         "What z-loss keeps near 0 (Wortsman et al. 2023 §3.2)."),
        ("adam", "Adam signals", lambda: rf.adam_figure(pairs), "No Adam signals recorded (adam/*): section omitted.", ""),
        ("sharpness", "Sharpness against its threshold", lambda: rf.sharpness_figure(pairs),
         "No sharpness recorded (hessian/max_eig needs the full probe preset with a probe loss): section omitted.",
         "Dashed: the optimizer's stability threshold at the current LR (2/lr for GD, 38/lr for Adam at beta1 = 0.9)."),
    ]
    sections = [_Section("diagnosis", "Diagnosis", "".join(_diagnosis_card(lbl, g) for lbl, g in zip(labels, diagnoses)))]
    sections += [_figure_section(*spec) for spec in figures]
    timeline = _figure_section("timeline", "Event timeline", lambda: rf.timeline_figure(pairs), "No events.")
    timeline.body += "".join(_events_table(lbl, d.events) for lbl, d in pairs)
    sections.append(timeline)
    autopsies = [(lbl, v) for lbl, d in zip(labels, datas) for v in _autopsies(store_path, d)]
    if autopsies:
        sections.append(_Section("autopsy", "Spike autopsy", "".join(_autopsy_block(lbl, v) for lbl, v in autopsies)))
    sections.append(_Section("config", "Config and environment", "".join(_config_block(lbl, d, store_path) for lbl, d in pairs)))
    title = "seismo report: " + ", ".join(labels)
    return _page(title, f"{len(datas)} run{'s' if len(datas) > 1 else ''} from <code>{_e(store_path)}</code>", sections)


# --- sweeps -------------------------------------------------------------------------------

def _attn_threshold() -> float:
    """The failure level of the ``attention_logit_growth`` detector: what 'unstable' means."""
    return next(float(d.threshold) for d in default_detectors() if d.name == "attention_logit_growth")


def _divergence_tables(table: SweepTable) -> str:
    out = []
    for iv in sorted({r["intervention"] for r in table.rows}):
        sizes, lrs, grid = divergence_map(table, iv)
        rows = []
        for size, line in zip(sizes, grid):
            cells = [_e(size)]
            for frac in line:
                if np.isnan(frac):
                    cells.append('<span class="note">-</span>')
                else:
                    shade = int(255 - 140 * frac)
                    cells.append(f'<span style="display:block;background:rgb(255,{shade},{shade})">{frac:.0%}</span>')
            rows.append(cells)
        out.append(f"<h3>{_e(iv)}</h3>" + _table(["size \\ lr"] + [f"{lr:g}" for lr in lrs], rows, [False] + [True] * len(lrs)))
    return "<p class=\"sub\">Fraction of diverged trials per size and learning rate.</p>" + "".join(out)


def _prediction(table: SweepTable, target_params: float | None) -> _Section:
    ivs = sorted({r["intervention"] for r in table.rows})
    base = "baseline" if "baseline" in ivs else ivs[0]
    sizes = sorted(table.n_params.values())
    if len(sizes) < 2:
        return _Section("prediction", "Prediction", '<p class="note">The prediction needs at least two model sizes: section omitted.</p>')
    target = target_params or 4.0 * sizes[-1]
    pred = predict_attn_logits(table, target, base)
    if not pred:
        return _Section("prediction", "Prediction", '<p class="note">No attention logits recorded at two sizes: section omitted.</p>')
    threshold = _attn_threshold()
    rows = [[f"{lr:g}", _num(v), "<b>unstable</b>" if v >= threshold else "stable"] for lr, v in pred.items()]
    body = (f"<p>Max attention logit of <b>{_e(base)}</b> extrapolated to {target:.3g} non-embedding parameters by a power-law fit "
            f"over the smaller sizes, per learning rate (Wortsman et al. 2023, arXiv 2309.14322 §3.1.2). Unstable: the prediction "
            f"reaches {threshold:g}, the attention_logit_growth detector's failure level.</p>"
            + _table(["lr", "predicted max attention logit", "verdict"], rows, [True, True, False]))
    fig = attn_logit_vs_size_figure(table)
    if fig is not None:
        body += f'<div class="fig">{figure_svg(fig)}</div>'
    return _Section("prediction", "Prediction", body)


def render_sweep(store_path: str | os.PathLike, name: str, *, predict_params: float | None = None) -> str:
    """The HTML report of the sweep ``name`` stored at ``store_path``."""
    store_path = Path(store_path)
    with RunStore(store_path) as store:
        table = load_sweep(store, name)
        if not table.rows:
            raise ConfigError(f"sweep: no finished trial of sweep {name!r} in {store_path}")
        rows = sorted(table.rows, key=lambda r: (r["intervention"], r.get("n_params") or 0, r["lr"], r.get("seed", 0)))
        curves = [(accuracy_figure(store, rows), "Accuracy and Softmax Collapse per trial"),
                  (sharpness_trials_figure(store, rows), "Sharpness per trial")]
    sens_rows = [[_e(iv), _e(size), _num(table.n_params.get(size)), _num(s), f"{table.best_lr[(iv, size)]:g}",
                  f"{table.divergence[(iv, size)]:.0%}"]
                 for (iv, size), s in sorted(table.sensitivity.items(), key=lambda kv: (kv[0][0], table.n_params.get(kv[0][1], 0)))]
    sens_body = ("<p class=\"sub\">LR sensitivity: mean over the LR grid of the final loss (capped at the initial loss) minus the best "
                 "(Wortsman et al. 2023, arXiv 2309.14322 §2). Lower is more robust.</p>"
                 + _table(["intervention", "size", "params", "LR sensitivity", "best lr", "diverged"], sens_rows,
                          [False, False, True, True, True, True]))
    if len(table.n_params) > 1:
        sens_body += f'<div class="fig">{figure_svg(sensitivity_vs_size_figure(table))}</div>'
    trial_rows = [[str(r["run_id"]), _e(r["intervention"]), _e(r["size"]), f"{r['lr']:g}", _e(r.get("seed", "")), _e(r["status"]),
                   _num(r.get("final_val_loss")), _num(r.get("max_attn_logit"))] for r in rows]
    sections = [
        _figure_section("loss-vs-lr", "Final loss against learning rate", lambda: loss_vs_lr_figure(table), "No trials.",
                        "One panel per intervention, one line per size; diverged trials count as the initial loss."),
        _Section("sensitivity", "LR sensitivity", sens_body),
        _Section("divergence", "Divergence map", _divergence_tables(table)),
        _prediction(table, predict_params),
    ]
    for i, (fig, title) in enumerate(curves):
        if fig is not None:
            sections.append(_Section(f"curves-{i}", title, f'<div class="fig">{figure_svg(fig)}</div>'))
    header = ["run id", "intervention", "size", "lr", "seed", "status", "final val loss", "max attn logit"]
    sections.append(_Section("trials", "Trials", _table(header, trial_rows, [True, False, False, True, True, False, True, True])))
    subtitle = f"{len(rows)} trials from <code>{_e(store_path)}</code>"
    return _page(f"seismo sweep report: {name}", subtitle, sections)


# --- entry point --------------------------------------------------------------------------

def _resolve(store_path: Path, refs: Sequence[str | int]) -> tuple[str, str | None]:
    """``("runs", None)`` or ``("sweep", name)``: one reference that is not a run but a sweep name
    is a sweep; anything else must name runs (the store's error lists what exists)."""
    if len(refs) == 1 and isinstance(refs[0], str):
        with RunStore(store_path) as store:
            try:
                store.find_run(refs[0])
            except StoreError:
                if refs[0] in sweep_names(store):
                    return "sweep", refs[0]
                raise
    return "runs", None


def write_report(store: str | os.PathLike | RunStore, runs: str | int | Sequence[str | int], out: str | os.PathLike,
                 *, predict_params: float | None = None) -> Path:
    """Write the HTML report of ``runs`` (run ids or names, overlaid in one page), or of a sweep
    (a single sweep name), to ``out`` atomically; returns the path.

    ``store`` is the run store (a path or an open :class:`~seismo.store.RunStore`). Raises
    :class:`~seismo.store.StoreError` for a missing store or run and
    :class:`~seismo.report.figures.MissingExtra` without matplotlib.
    """
    store_path = Path(store.path if isinstance(store, RunStore) else store)
    if not store_path.exists():
        raise StoreError(f"run store {store_path} does not exist")
    refs = [runs] if isinstance(runs, (str, int)) else list(runs)
    if not refs:
        raise ConfigError("runs: name at least one run (or one sweep)")
    kind, sweep = _resolve(store_path, refs)
    text = render_sweep(store_path, sweep, predict_params=predict_params) if kind == "sweep" else render_runs(store_path, refs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out, text)
