"""``seismo demo`` end to end (8 steps instead of 600)."""

from __future__ import annotations

import pytest

from seismo.cli import main
from seismo.store import RunStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    pngs = list(out.glob("demo-*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in text.splitlines() if "│" in line]
    assert any("unstable" in r for r in rows)
    assert any("qk-norm + z-loss" in r for r in rows)
    with RunStore(out / "seismo.sqlite") as store:
        names = sorted(r.name for r in store.runs())
    assert len(names) == 2
    assert names[0].startswith("demo-qknorm-zloss-") and names[1].startswith("demo-unstable-")
    for name in names:  # each run wrote its own directory, named after the run
        assert (out / name / "result.json").is_file()
