"""The Detection section of docs/BENCHMARKS.md says only what its own tables say: its prose is
the template bench/_detection_doc.md filled from the tables printed under it."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from _detection_prose import find, parse_tables, prose_values, render_prose  # noqa: E402

BEGIN, END = "<!-- detection:begin -->", "<!-- detection:end -->"


def section() -> str:
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    return text[text.index(BEGIN) + len(BEGIN): text.index(END)]


def test_the_prose_is_the_template_filled_from_the_tables_below_it():
    sec = section()
    tables = parse_tables(sec)
    expected = render_prose(tables)
    assert expected.strip() in sec, "the Detection prose differs from what its tables give; rerun `bench/detection.py --render`"


def test_the_check_would_catch_a_number_that_does_not_match():
    tables = parse_tables(section())
    header, rows = find(tables, "Generated test split: spike detection")
    i = header.index("F1")
    row = next(r for r in rows if r[0] == "loss_spike" and r[1] == "seismo")
    before = prose_values(tables)["loss_f1"]
    row[i] = "0.123"
    assert before != "0.123" and "0.123" in render_prose(tables)
    assert prose_values(tables)["loss_goal"] == "**Not met.**"


def test_no_stale_note_and_the_fresh_test_split_is_named():
    sec = section()
    assert "Defaults changed since" not in sec
    assert "seed 3" in sec
