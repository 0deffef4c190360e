"""The Detection section's prose, generated from its own tables.

``bench/_detection_doc.md`` is a template: every number (and every comparison word such as
"better" / "worse") in it is a ``{placeholder}`` filled by :func:`prose_values` from the tables
``bench/detection.py`` prints. ``tests/docs/test_detection_doc.py`` parses the tables back out of
docs/BENCHMARKS.md, renders the template from them and checks the prose there is exactly that.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["TEMPLATE", "prose_values", "render_prose", "parse_tables", "find"]

TEMPLATE = Path(__file__).resolve().parent / "_detection_doc.md"
Table = tuple[str, list[str], list[list[str]]]


def parse_tables(md: str) -> list[Table]:
    """``#### title`` + markdown table blocks, back to (title, header, rows)."""
    out: list[Table] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#### "):
            title = lines[i][5:]
            j = i + 1
            while j < len(lines) and not lines[j].startswith("|"):
                j += 1
            block = []
            while j < len(lines) and lines[j].startswith("|"):
                block.append(lines[j])
                j += 1
            if len(block) >= 2:
                cells = [_cells(b) for b in block]
                out.append((title, cells[0], cells[2:]))
            i = j
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip()[1:-1])
    return [p.strip().replace("\\|", "|") for p in parts]


def find(tables: list[Table], title_start: str) -> tuple[list[str], list[list[str]]]:
    for title, header, rows in tables:
        if title.startswith(title_start):
            return header, rows
    raise KeyError(f"no table titled {title_start!r}...")


def _row(tables, title_start: str, **match) -> dict[str, str]:
    header, rows = find(tables, title_start)
    for r in rows:
        d = dict(zip(header, r))
        if all(d.get(k) == v for k, v in match.items()):
            return d
    raise KeyError(f"{title_start!r}: no row {match}")


def _rows(tables, title_start: str, **match) -> list[dict[str, str]]:
    header, rows = find(tables, title_start)
    return [d for d in (dict(zip(header, r)) for r in rows) if all(d.get(k) == v for k, v in match.items())]


def _cmp(a: float, b: float, more: str = "better", less: str = "worse", same: str = "as good") -> str:
    return more if a > b else less if a < b else same


def _f1_of(cell: str) -> float:
    return float(cell.split()[0])


def prose_values(tables: list[Table]) -> dict[str, str]:
    """Every value the template needs, read from the tables (strings, as printed there)."""
    v: dict[str, str] = {}
    main = "Generated test split: spike detection"
    det = {d["detector"]: d for d in _rows(tables, main, kind="loss_spike")}
    gdet = {d["detector"]: d for d in _rows(tables, main, kind="grad_spike")}
    s, sw = det["seismo"], det["seismo warning+"]
    tuned_l = next(n for n in det if n.startswith("seismo tuned"))
    tuned_g = next(n for n in gdet if n.startswith("seismo tuned"))
    v.update(loss_f1=s["F1"], loss_p=s["precision"], loss_r=s["recall"], loss_lat=s["median latency (steps)"],
             loss_fp=s["FP"], loss_tp=s["TP"], loss_fn=s["FN"],
             warn_f1=sw["F1"], warn_p=sw["precision"], warn_r=sw["recall"], warn_fp=sw["FP"],
             tuned_loss_name=tuned_l, tuned_loss_f1=det[tuned_l]["F1"],
             tuned_grad_name=tuned_g, tuned_grad_f1=gdet[tuned_g]["F1"],
             grad_f1=gdet["seismo"]["F1"], grad_p=gdet["seismo"]["precision"], grad_r=gdet["seismo"]["recall"])
    for peer in ("olmo_core", "llm_foundry", "lightning"):
        v[f"{peer}_f1"] = det[peer]["F1"]
        v[f"{peer}_lat"] = det[peer]["median latency (steps)"]
    v["olmo_grad_f1"] = gdet["olmo_core"]["F1"]
    best_peer = max(("olmo_core", "llm_foundry", "lightning"), key=lambda p: float(det[p]["F1"]))
    v["best_peer"] = best_peer
    v["loss_goal"] = "**Met.**" if float(s["F1"]) >= 0.95 else "**Not met.**"
    lat = float(s["median latency (steps)"])
    faster = all(lat <= float(det[p]["median latency (steps)"]) for p in ("olmo_core", "llm_foundry", "lightning"))
    beats = all(float(s["F1"]) > float(det[p]["F1"]) for p in ("olmo_core", "llm_foundry", "lightning"))
    pretty = {"olmo_core": "OLMo-core", "llm_foundry": "llm-foundry", "lightning": "Lightning"}
    v["beats_loss"] = "higher than all three peers'" if beats else (
        f"{_cmp(float(s['F1']), float(det[best_peer]['F1']), 'higher than', 'lower than', 'equal to')} {pretty[best_peer]}'s")
    v["peers_goal"] = ("**Met on the generated set.**" if beats and faster else
                       "**Not met on the generated set.**")
    v["grad_vs_olmo"] = _cmp(float(gdet["seismo"]["F1"]), float(gdet["olmo_core"]["F1"]), "higher than", "lower than", "equal to")
    # noise variants
    noise_t = "F1 (precision / recall) by noise variant"
    nz = {d["detector"]: d for d in _rows(tables, noise_t, kind="loss_spike")}
    gnz = {d["detector"]: d for d in _rows(tables, noise_t, kind="grad_spike")}
    v["gauss_f1"], v["gauss_p"] = nz["seismo"]["gauss"].split()[0], nz["seismo"]["gauss"].split()[1].strip("(")
    v["t3_f1"] = nz["seismo"]["Student-t df 3"].split()[0]
    v["grad_gauss_f1"] = gnz["seismo"]["gauss"].split()[0]
    v["olmo_grad_gauss_f1"] = gnz["olmo_core"]["gauss"].split()[0]
    v["grad_gauss_cmp"] = _cmp(_f1_of(gnz["seismo"]["gauss"]), _f1_of(gnz["olmo_core"]["gauss"]))
    # strata: share of 3-6 sigma episodes and their recall
    st = "Recall by stratum"
    eps = {d["stratum"]: int(d["episodes"]) for d in _rows(tables, st, kind="loss_spike") if d["stratum"].startswith("height")}
    v["low_share"] = f"{100 * eps['height 3-6 sigma'] / sum(eps.values()):.0f}%"
    v["low_recall"] = _row(tables, st, kind="loss_spike", stratum="height 3-6 sigma")["seismo"]
    v["tall_recall"] = _row(tables, st, kind="loss_spike", stratum="height >=30 sigma")["seismo"]
    # false alarms by noise
    fa = "False-alarm episodes by series family"
    for kind, key in (("loss_spike", "loss"), ("grad_spike", "grad")):
        rows = [d for d in _rows(tables, fa, kind=kind) if d["family"].startswith("noise:")]
        total = sum(int(d["seismo"]) for d in rows)
        t3 = sum(int(d["seismo"]) for d in rows if d["family"] == "noise:student_t3")
        v[f"{key}_fp_t3"], v[f"{key}_fp_all"] = str(t3), str(total)
    # real runs (optional: --no-real leaves them out)
    try:
        header, rows = find(tables, "Real runs: spike episodes")
        rs = {(d["kind"], d["detector"]): d for d in (dict(zip(header, r)) for r in rows)}
        for kind, key in (("loss_spike", "rl"), ("grad_spike", "rg")):
            for name, short in (("seismo", "s"), ("olmo_core", "o"), ("llm_foundry", "f"), ("lightning", "l")):
                d = rs.get((kind, name))
                if d:
                    v[f"{key}_{short}_tp"], v[f"{key}_{short}_fn"], v[f"{key}_{short}_fp"] = d["TP"], d["FN"], d["FP"]
                    v[f"{key}_{short}_f1"] = d["F1"]
            v[f"{key}_n"] = str(int(v[f"{key}_s_tp"]) + int(v[f"{key}_s_fn"]))
        kinds = _rows(tables, "Real runs: per kind")
        missed = [f"`{d['kind']}` (recall {d['recall']} over {d['positive runs']} run(s))" for d in kinds
                  if d["recall"] not in ("1.00", "-")]
        wrong = [f"`{d['kind']}` (precision {d['precision']})" for d in kinds if d["precision"] not in ("1.00", "-")]
        v["real_missed"] = ", ".join(missed) or "none"
        v["real_wrong"] = ", ".join(wrong) or "none"
        named = _rows(tables, "Real runs: module named")
        v["named_right"] = str(sum(int(d["named right / detected"].split(" / ")[0]) for d in named))
        v["named_detected"] = str(sum(int(d["named right / detected"].split(" / ")[1]) for d in named))
    except KeyError:
        pass
    # tuning split
    for title, header, rows in tables:
        m = re.match(r"Tuning split \(seed (\d+), (\d+) series\), (\w+): .*defaults z=([\d.]+), rel=([\d.]+)", title)
        if not m:
            continue
        key = "tl" if m.group(3) == "loss_spike" else "tg"
        f1 = {}  # setting as printed ("z=7, rel=0.02[, window=64]") -> F1 on the tuning split
        for r in rows:
            if r[0].startswith("z=") and "," not in r[0]:
                for h, c in zip(header[1:], r[1:]):
                    f1[f"{r[0]}, {h}"] = _f1_of(c)
            else:
                f1[r[0]] = _f1_of(r[1])
        v[f"{key}_default_f1"] = f"{f1[f'z={m.group(4)}, rel={m.group(5)}']:.3f}"
        tuned = v["tuned_loss_name" if key == "tl" else "tuned_grad_name"]
        v[f"{key}_best"] = tuned[tuned.index("(") + 1: tuned.rindex(")")]  # what the test split scored
        v[f"{key}_best_f1"] = f"{f1[v[f'{key}_best']]:.3f}"
        v["tune_seed"] = m.group(1)
    return v


def render_prose(tables: list[Table], template: str | None = None) -> str:
    text = TEMPLATE.read_text() if template is None else template
    return text.format(**prose_values(tables))
