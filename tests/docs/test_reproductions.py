"""docs/REPRODUCTIONS.md quotes only numbers recomputed from the committed sweeps
(docs/reproductions/<preset>/trials.json) by bench/check_reproductions.py, verdicts included."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import check_reproductions as cr  # noqa: E402

from seismo.proxy.sweep_presets import SWEEP_PRESETS, get_sweep_preset  # noqa: E402

STORED = sorted(p.parent.name for p in (ROOT / "docs" / "reproductions").glob("*/trials.json"))


def test_the_doc_equals_the_text_generated_from_the_stored_sweeps():
    diff = cr.check()
    assert not diff, "docs/REPRODUCTIONS.md differs from the stored sweeps:\n" + "\n".join(diff[:60])


def test_every_preset_has_a_generated_block_and_nothing_else_does():
    text = cr.DOC.read_text()
    blocks = re.findall(r"<!-- BEGIN GENERATED (\S+) -->", text)
    assert sorted(blocks) == sorted([*SWEEP_PRESETS, "summary"])
    assert sorted(re.findall(r"<!-- END GENERATED (\S+) -->", text)) == sorted(blocks)


def test_prose_outside_the_blocks_quotes_no_measured_loss_or_sensitivity():
    """Numbers with three decimals (losses, sensitivities, ratios) appear only in generated text;
    the one setting written that way is Adam's beta2 0.999."""
    text = re.sub(r"<!-- BEGIN GENERATED (\S+) -->.*?<!-- END GENERATED \1 -->", "", cr.DOC.read_text(), flags=re.S)
    assert set(re.findall(r"\b\d\.\d{3}\b", text)) <= {"0.999"}


@pytest.mark.parametrize("preset", STORED)
def test_stored_trials_are_the_presets_grid(preset):
    """Each stored trial is a cell of the preset it is filed under (interventions, sizes, LRs, seeds)."""
    d = json.loads((ROOT / "docs" / "reproductions" / preset / "trials.json").read_text())
    sweep = get_sweep_preset(preset, d["quick"])
    assert d["sweep"] == sweep.name
    assert d["interventions"] == sweep.interventions and d["overrides"] == sweep.overrides
    for r in d["trials"]:
        assert r["intervention"] in sweep.interventions and r["size"] in sweep.sizes and r["lr"] in sweep.lrs
        assert r["seed"] in get_sweep_preset(preset, False).seeds
        assert r["status"] in ("completed", "diverged")


def test_a_changed_number_is_caught(tmp_path):
    """The check fails when one quoted number differs from the data."""
    text = cr.DOC.read_text()
    m = re.search(r"<!-- BEGIN GENERATED \S+ -->.*?(\d\.\d{3})", text, flags=re.S)
    if m is None:
        pytest.skip("no stored sweep quoted yet")
    wrong = text[:m.start(1)] + ("9.999" if m.group(1) != "9.999" else "1.111") + text[m.end(1):]
    doc = tmp_path / "REPRODUCTIONS.md"
    doc.write_text(wrong)
    assert cr.check(doc)
    doc.write_text(text)
    assert not cr.check(doc)


def test_verdict_rule_by_hand():
    from seismo.proxy.measures import Spread

    lo, hi, mid = Spread(1.0, 0.1, 0.9, 1.1, 3), Spread(2.0, 0.1, 1.9, 2.1, 3), Spread(1.5, 0.5, 1.0, 2.0, 3)
    assert cr.separation(lo, hi) == "lower" and cr.separation(hi, lo) == "higher" and cr.separation(lo, mid) == "overlap"
    assert cr.verdict_lower(["lower", "lower"]) == "agrees"
    assert cr.verdict_lower(["lower", "overlap"]) == "partly"
    assert cr.verdict_lower(["higher", "overlap"]) == "does not"
    assert cr.verdict_lower(["overlap", "overlap"]) == "not measurable at this scale"
    assert cr.num(3.3e5) == "3.3e5" and cr.num(26.49) == "26.5" and cr.num(float("nan")) == "n/a"


@pytest.mark.parametrize("preset", sorted(SWEEP_PRESETS))
def test_every_block_renders_a_verdict_from_a_synthetic_sweep(preset, tmp_path, monkeypatch):
    """Each preset's block renders from a stored sweep of its grid (3 seeds, made-up numbers): a
    preset whose trials arrive later is rendered, not crashed on."""
    sweep = get_sweep_preset(preset, True)
    rng = np.random.default_rng(0)
    trials = []
    for i, iv in enumerate(sweep.interventions):
        for j, size in enumerate(sweep.sizes):
            for lr in sweep.lrs:
                for seed in (0, 1, 2):
                    loss = 2.5 + 0.3 * abs(math.log10(lr) + 2) + 0.05 * rng.standard_normal() - 0.1 * i
                    trials.append(dict(intervention=iv, size=size, lr=lr, seed=seed, status="completed", init_loss=5.5,
                                       final_val_loss=loss, final_train_loss=loss - 0.1, max_attn_logit=10.0 * (j + 1) * lr * 100 / (i + 1),
                                       final_logz=5.0 + i, n_params=1e4 * 4 ** j, wall_time=1.0, final_val_acc=0.5, final_train_acc=1.0,
                                       grok_step=100 if iv == "perp_grad" else None, max_softmax_collapse=0.2 if iv == "softmax" else 0.0,
                                       sharpness_ratio=1.0, max_sharpness_ratio=1.2))
    d = tmp_path / preset
    d.mkdir()
    stored = dict(preset=preset, sweep=sweep.name, quick=True, seismo_commit="test", overrides=sweep.overrides,
                  interventions=sweep.interventions, sizes=sweep.sizes, lrs=sweep.lrs, trials=trials)
    (d / "trials.json").write_text(json.dumps(stored))
    monkeypatch.setattr(cr, "DATA", tmp_path)
    text = cr.generate_block(preset)
    assert cr.VERDICT.search(text), text
    assert f"| `{preset}` |" in cr.generate_block("summary") and "quick variant, 3 seeds" in cr.generate_block("summary")
