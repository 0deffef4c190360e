"""The HTML report: escaping checked by parsing the page, sections and notes, diagnosis at the top,
the numbers of the sweep tables against hand computations."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from report_data import EVENTS, XSS, signals, write_run, write_sweep  # noqa: E402

from seismo.errors import ConfigError  # noqa: E402
from seismo.report import run_figures as rf  # noqa: E402
from seismo.report import write_report  # noqa: E402
from seismo.report.html import CSP  # noqa: E402
from seismo.report.sweep_report import lr_sensitivity  # noqa: E402
from seismo.store import StoreError, load_run  # noqa: E402


class Page(HTMLParser):
    """Every element (tag, attrs, enclosing section id) and the text of each section."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict, str]] = []
        self.text: dict[str, list[str]] = {}
        self.section = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.section = attrs.get("id", "")
        self.elements.append((tag, attrs, self.section))

    def handle_data(self, data):
        self.text.setdefault(self.section, []).append(data)

    def section_text(self, sid: str) -> str:
        return " ".join(self.text.get(sid, []))

    def tags(self, tag: str, section: str | None = None) -> list[dict]:
        return [a for t, a, s in self.elements if t == tag and (section is None or s == section)]


def _report(store_path, tmp_path, runs, **kw) -> tuple[str, Page]:
    out = write_report(store_path, runs, tmp_path / "out" / "report.html", **kw)
    text = out.read_text(encoding="utf-8")
    return text, Page(text)


def test_user_strings_are_text_never_markup(store_path, tmp_path):
    config = {"note": "</pre><script>alert(3)</script>", "model": {"name": XSS}}
    write_run(store_path, XSS, signals(), EVENTS, config=config, meta={"torch": "2.13.0", "x": "<b>bold</b>"})
    text, page = _report(store_path, tmp_path, [XSS])
    assert page.tags("script") == []  # no <script> element at all, in particular none from user text
    assert not [a for _, a, _ in page.elements if any(k.startswith("on") for k in a)]  # no event-handler attribute
    assert page.tags("img") == []  # the event message's <img onerror> stays text
    assert page.tags("b", "config") == []
    # ... and every one of them is shown, as text
    assert XSS in page.section_text("diagnosis")
    assert "<img src=x onerror=alert(2)>" in page.section_text("timeline")
    assert "</pre><script>alert(3)</script>" in page.section_text("config")
    assert "<title>seismo report: &lt;script&gt;alert(1)&lt;/script&gt;</title>" in text


def test_the_page_can_request_nothing(store_path, tmp_path):
    write_run(store_path, "r", signals(), EVENTS)
    text, page = _report(store_path, tmp_path, ["r"])
    (csp,) = [a for a in page.tags("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp["content"] == CSP == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
    refs = [v for _, a, _ in page.elements for k, v in a.items() if k in ("src", "href", "xlink:href", "action") and v]
    assert refs, "the page has internal links and embedded images"
    assert all(v.startswith(("#", "data:image/png;base64,")) for v in refs), refs
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text)
    assert page.tags("link") == [] and page.tags("iframe") == [] and page.tags("object") == []


def test_every_section_is_drawn_in_order_with_the_diagnosis_first(store_path, tmp_path):
    write_run(store_path, "r", signals(), EVENTS)
    _, page = _report(store_path, tmp_path, ["r"])
    ids = [a["id"] for a in page.tags("section")]
    assert ids == ["diagnosis", "loss", "attn-logit", "attn-entropy", "logz", "adam", "sharpness", "timeline", "config"]
    for sid in ids[1:-1]:
        assert page.tags("svg", sid), f"section {sid} has no figure"
    # heatmaps carry their pixels inline
    assert any(a.get("xlink:href", "").startswith("data:image/png;base64,") for a in page.tags("image", "attn-logit"))
    diag = page.section_text("diagnosis")
    assert "attention logits grew without bound" in diag  # the cause of the stored attention_logit_growth events
    assert "first seen at step 30" in diag
    assert "qk-layernorm" in diag and "arXiv 2309.14322" in diag and "seismo.mitigate.QKNorm" in diag
    assert "growing" in diag  # the evidence: the first event's message


def test_missing_signals_give_a_note_not_an_error(store_path, tmp_path):
    only_loss = {"loss": signals()["loss"]}
    write_run(store_path, "bare", only_loss)
    _, page = _report(store_path, tmp_path, ["bare"])
    for sid, what in [("attn-logit", "attn/logit_max"), ("attn-entropy", "attn/entropy_min"), ("logz", "logits/logz"),
                      ("adam", "adam/"), ("sharpness", "hessian/max_eig")]:
        assert page.tags("svg", sid) == []
        assert "section omitted" in page.section_text(sid) and what in page.section_text(sid)
    assert page.tags("svg", "loss")
    assert "No instability detected" in page.section_text("diagnosis")


def test_two_runs_are_overlaid(store_path, tmp_path):
    write_run(store_path, "unstable", signals(growth=0.12), EVENTS)
    calm = {k: v for k, v in signals(growth=0.0).items() if not k.startswith("hessian/")}
    write_run(store_path, "stable", calm)
    _, page = _report(store_path, tmp_path, ["unstable", "stable"])
    diag = page.section_text("diagnosis")
    cause, calm_card = diag.index("attention logits grew without bound"), diag.index("No instability detected")
    assert diag.index("unstable") < cause < diag.index("stable", cause) < calm_card  # one card per run, in order
    assert len(page.tags("svg", "loss")) == 1  # both runs in one figure


def test_loss_figure_lines_and_event_markers_are_the_stored_data(store_path):
    run_id = write_run(store_path, "r", signals(), EVENTS)
    data = load_run(store_path, run_id)
    fig = rf.loss_figure([("r", data)])
    loss_ax, grad_ax = fig.axes
    loss_line = [ln for ln in loss_ax.lines if ln.get_label() == "r"][0]
    np.testing.assert_allclose(loss_line.get_ydata(), signals()["loss"][1])
    warn = [ln for ln in loss_ax.lines if ln.get_label() == "_warning events"][0]
    crit = [ln for ln in loss_ax.lines if ln.get_label() == "_critical events"][0]
    assert list(warn.get_xdata()) == [30] and list(crit.get_xdata()) == [50]
    np.testing.assert_allclose(warn.get_ydata(), [signals()["loss"][1][30]])  # on the curve at the event's step
    assert grad_ax.get_yscale() == "log"


def test_heatmap_pixels_are_log10_of_each_layers_series(store_path):
    run_id = write_run(store_path, "r", signals())
    data = load_run(store_path, run_id)
    fig = rf.heatmap_figure([("r", data)], "attn/logit_max/", "max attention logit", log=True)
    image = fig.axes[0].images[0]
    want = np.log10(np.vstack([np.full(60, 8.0), 2.0 * np.exp(0.08 * np.arange(60))]))
    np.testing.assert_allclose(np.asarray(image.get_array()), want)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["h.0.attn", "h.1.attn"]


def test_thin_keeps_spikes():
    steps = np.arange(10_000)
    values = np.ones(10_000)
    values[6_543] = 1e6
    s, v = rf.thin(steps, values, max_points=200)
    assert len(s) <= 200 and 6_543 in s.tolist() and v.max() == 1e6


def test_sweep_report_tables_match_hand_computations(store_path, tmp_path):
    write_sweep(store_path, "toy")
    text, page = _report(store_path, tmp_path, ["toy"], predict_params=2e8)
    ids = [a["id"] for a in page.tags("section")]
    assert ids[:4] == ["loss-vs-lr", "sensitivity", "divergence", "prediction"]
    sens = page.section_text("sensitivity")
    # baseline, size s: capped losses (3.0, 2.5, 5.5 for the diverged lr) -> mean of (0.5, 0, 3.0)
    assert f"{3.5 / 3:.4g}" in sens
    assert f"{(0.5 + 0.0 + 0.3) / 3:.4g}" in sens  # qk_norm, size s: (2.9, 2.4, 2.7)
    assert lr_sensitivity([3.0, 2.5, np.nan], 5.5) == pytest.approx(3.5 / 3)
    assert sens.count("33%") == 2 and sens.count("0%") == 2  # the baseline diverged at one lr of three (both sizes)
    div = page.section_text("divergence")
    # per intervention: rows s, m; columns lr 0.001, 0.01, 0.1
    assert "baseline size \\ lr 0.001 0.01 0.1 s 0% 0% 100% m 0% 0% 100%" in " ".join(div.split())
    assert "qk_norm size \\ lr 0.001 0.01 0.1 s 0% 0% 0% m 0% 0% 0%" in " ".join(div.split())
    pred = page.section_text("prediction")
    # logit = 0.3 sqrt(N) at lr 0.1: 0.3 * sqrt(2e8) = 4243 >= 1000 -> unstable; lr 0.01: 424 -> stable
    assert "4243" in pred and "424.3" in pred
    rows = re.findall(r"<tr><td class=\"num\">([^<]*)</td><td class=\"num\">([^<]*)</td><td>(.*?)</td></tr>", text)
    verdicts = {float(lr): v for lr, _, v in rows}
    assert verdicts[0.1] == "<b>unstable</b>" and verdicts[0.01] == "stable"


def test_bad_references_fail_with_one_line(store_path, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        write_report(store_path, ["x"], tmp_path / "r.html")
    write_run(store_path, "r", signals())
    with pytest.raises(StoreError, match="no run 'nope'"):
        write_report(store_path, ["nope"], tmp_path / "r.html")
    with pytest.raises(ConfigError, match="runs"):
        write_report(store_path, [], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_a_diverged_run_with_nan_and_inf_renders(store_path, tmp_path):
    sig = signals()
    for name, (s, v) in sig.items():
        v = v.copy()
        v[len(v) // 2:] = np.nan
        v[-1] = np.inf
        sig[name] = (s, v)
    sig["grad/norm/all_nan"] = (sig["loss"][0], np.full(len(sig["loss"][0]), np.nan))
    write_run(store_path, "boom", sig, [{"step": 40, "kind": "nonfinite", "severity": "critical", "message": "loss is NaN"}],
              status="diverged")
    _, page = _report(store_path, tmp_path, ["boom"])
    assert page.tags("svg", "loss") and page.tags("svg", "attn-logit")
    assert "NaN/Inf appeared" in page.section_text("diagnosis")


def test_a_figure_that_fails_costs_its_section_only(store_path, tmp_path, monkeypatch, caplog):
    write_run(store_path, "r", signals(), EVENTS)

    def broken(runs):
        raise ValueError("odd <data>")

    monkeypatch.setattr(rf, "logz_figure", broken)
    _, page = _report(store_path, tmp_path, ["r"])
    assert "could not be drawn: ValueError: odd <data>" in page.section_text("logz")
    assert page.tags("data") == [] and page.tags("svg", "adam")  # escaped; the other sections are drawn
    assert "section 'Output log Z' not drawn: ValueError: odd <data>" in caplog.text


def test_adam_and_sharpness_panels_hold_the_stored_values(store_path):
    run_id = write_run(store_path, "r", signals())
    data = load_run(store_path, run_id)
    fig = rf.adam_figure([("r", data)])
    cos_ax, std_ax, eps_ax = fig.axes
    np.testing.assert_allclose(cos_ax.lines[0].get_ydata(), np.linspace(0.5, 0.1, 6))
    # max over modules by hand: h.0 is 0.2 throughout, h.1 rises from 0.2 to 0.9
    np.testing.assert_allclose(std_ax.lines[0].get_ydata(), np.maximum(0.2, np.linspace(0.2, 0.9, 6)))
    np.testing.assert_allclose(eps_ax.lines[0].get_ydata(), np.full(6, 0.01))
    fig = rf.sharpness_figure([("r", data)])
    (ax,) = fig.axes
    eig, threshold = ax.lines
    np.testing.assert_allclose(eig.get_ydata(), [10.0, 200.0, 400.0])
    assert threshold.get_linestyle() == "--" and list(threshold.get_ydata()) == [380.0] * 3
    assert ax.get_yscale() == "log"


def test_a_stored_autopsy_appears_as_its_verdict_and_table(store_path, tmp_path):
    """``seismo autopsy`` stores a summary run ``<run>/autopsy@<step>`` whose meta holds the verdict;
    the run's report shows it (every cell escaped), and a run without autopsy has no such section."""
    write_run(store_path, "r", signals())
    write_run(store_path, "other", signals())
    rows = [
        {"name": "same_data", "effect": "reference", "peak_loss": 9.16, "peak_step": 32, "steps_to_recover": 5,
         "final_loss": 3.4, "moved": ["loss"]},
        {"name": XSS, "effect": "removes", "peak_loss": 3.41, "peak_step": 40, "steps_to_recover": None,
         "final_loss": 3.3, "moved": []},
    ]
    verdict = {"cause": "data", "sentence": "the spike comes from batches 30..32", "spike": 32, "start": 20, "rows": rows}
    write_run(store_path, "r/autopsy@32", {}, meta={"autopsy": verdict})
    write_run(store_path, "r/autopsy@32/same_data", {}, meta={"autopsy": {"cause": "not a summary"}})  # a replay run: ignored
    text, page = _report(store_path, tmp_path, ["r"])
    body = page.section_text("autopsy")
    assert "spike at step 32" in body and "cause  data" in body and "batches 30..32" in body
    cells = [c.strip() for c in page.text["autopsy"] if c.strip()]
    assert cells.count("same_data") == 1 and XSS in cells and "9.16" in cells and "removes" in cells
    assert "<script>alert" not in text.split('id="autopsy"')[1]
    _, page_other = _report(store_path, tmp_path, ["other"])
    assert "autopsy" not in page_other.text
