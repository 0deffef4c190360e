"""Runs recorded elsewhere come into the store whole (or not at all) and can be diagnosed."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from seismo.diagnose.engine import diagnose_run
from seismo.importers import ImportFormatError, import_run, read_run
from seismo.importers.importer import parse_mapping
from seismo.store import RunStore, load_run

PYTHIA = Path(os.environ.get("SEISMO_PYTHIA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "pythia"))


def _loss(n: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    x = 3.0 + 2.0 * np.exp(-t / 300) + 0.02 * rng.standard_normal(n)
    x[2000:2600] += 0.3  # a bump the detectors must find after the import
    return x


def _runs(store: Path) -> list[str]:
    if not store.exists():
        return []
    with RunStore(store) as rs:
        return [r.name for r in rs.runs()]


def test_csv_with_a_column_mapping_imports_and_diagnoses(tmp_path):
    x = _loss()
    src = tmp_path / "log.csv"
    src.write_text("step,train/lm_loss,lr\n" + "".join(f"{i},{float(v)!r},0.001\n" for i, v in enumerate(x)))
    store = tmp_path / "s.sqlite"
    run_id = import_run(src, mapping=parse_mapping(["loss=train/lm_loss"]), run_name="mine", store=store)
    data = load_run(store, "mine")
    assert data.info.run_id == run_id and data.info.meta["format"] == "csv"
    steps, vals = data.metrics["loss"]
    assert np.array_equal(np.asarray(steps), np.arange(len(x))) and np.array_equal(np.asarray(vals), x)
    assert np.allclose(data.metrics["lr"][1], 1e-3) and "train/lm_loss" not in data.metrics
    d = diagnose_run(str(store), "mine")
    bumps = [e for e in d.events if e.kind == "loss_regression"]
    assert bumps and 2000 <= bumps[0].step <= 2100, [(e.kind, e.step) for e in d.events]


def test_a_bad_cell_names_file_line_and_column_and_writes_nothing(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("step,loss\n0,2.0\n1,2.1\n2,oops\n3,2.0\n")
    store = tmp_path / "s.sqlite"
    with pytest.raises(ImportFormatError) as err:
        import_run(src, store=store)
    msg = str(err.value)
    assert msg.startswith(f"{src}:4:loss:") and "'oops' is not a number" in msg and "\n" not in msg
    assert _runs(store) == []  # nothing half-imported


def test_a_ragged_csv_row_and_a_missing_mapped_column_are_one_line_errors(tmp_path):
    src = tmp_path / "ragged.csv"
    src.write_text("step,loss\n0,2.0\n1,2.1,9\n")
    with pytest.raises(ImportFormatError, match=r"ragged.csv:3:3: 3 cells where the header has 2"):
        read_run(src)
    ok = tmp_path / "ok.csv"
    ok.write_text("step,loss\n0,2.0\n")
    with pytest.raises(ImportFormatError, match="no column 'train/lm_loss'"):
        read_run(ok, mapping={"loss": "train/lm_loss"})
    with pytest.raises(ImportFormatError, match="NAME=COLUMN"):
        parse_mapping(["loss"])


def test_jsonl_bad_line_names_line_and_column(tmp_path):
    src = tmp_path / "log.jsonl"
    src.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.9}\n{"step": 2, "loss": }\n')
    with pytest.raises(ImportFormatError, match=r"log.jsonl:3:\d+: not JSON"):
        read_run(src)
    src.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.9, "acc": 0.5}\n')
    run = read_run(src)
    assert run.metrics == {"loss": ([0, 1], [2.0, 1.9]), "acc": ([1], [0.5])}


def test_tensorboard_file_written_by_torch_imports_with_its_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    x = _loss(600)
    logdir = tmp_path / "tb"
    w = SummaryWriter(str(logdir))
    for i, v in enumerate(x):
        w.add_scalar("train/loss", float(v), i * 10)
        if i % 5 == 0:
            w.add_scalar("grad/norm", 1.0 + i / 100, i * 10)
    w.close()
    store = tmp_path / "s.sqlite"
    import_run(logdir, format="tensorboard", mapping={"loss": "train/loss"}, run_name="tb", store=store)
    data = load_run(store, "tb")
    steps, vals = data.metrics["loss"]
    assert list(steps) == list(range(0, 6000, 10))
    assert np.allclose(vals, x.astype(np.float32), rtol=0, atol=0)  # TensorBoard stores float32
    assert len(data.metrics["grad/norm"][0]) == 120
    with pytest.raises(ImportFormatError, match="no scalar summaries"):
        read_run(tmp_path, format="tensorboard")  # a directory without event files


def test_wandb_history_export_skips_bookkeeping_and_media(tmp_path):
    rows = [{"_step": i, "_runtime": 0.1 * i, "_timestamp": 1.7e9 + i, "train/loss": 2.0 - 0.001 * i,
             "samples": {"_type": "table-file", "path": "x.json"} if i % 10 == 0 else None} for i in range(50)]
    src = tmp_path / "history.json"
    src.write_text(json.dumps(rows))
    run = read_run(src, format="wandb", mapping={"loss": "train/loss"})
    assert sorted(run.metrics) == ["loss"]
    assert run.metrics["loss"][0] == list(range(50)) and run.metrics["loss"][1][3] == pytest.approx(1.997)
    csv_src = tmp_path / "history.csv"
    csv_src.write_text("_step,_runtime,train/loss\n" + "".join(f"{i},{i * 0.1},{2.0 - 0.001 * i}\n" for i in range(5)))
    assert sorted(read_run(csv_src, format="wandb").metrics) == ["train/loss"]


def test_store_is_untouched_when_the_write_fails(tmp_path, monkeypatch):
    src = tmp_path / "log.csv"
    src.write_text("step,loss\n" + "".join(f"{i},{2.0}\n" for i in range(100)))
    store = tmp_path / "s.sqlite"
    import_run(src, run_name="first", store=store)

    def boom(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(RunStore, "_insert_rows", staticmethod(boom))
    with pytest.raises(Exception, match="disk I/O"):
        import_run(src, run_name="second", store=store)
    monkeypatch.undo()
    assert _runs(store) == ["first"]  # the run row of the failed import was rolled back with its metrics


@pytest.mark.skipif(not PYTHIA.is_dir(), reason="the PolyPythia logs are not on this machine")
def test_a_pythia_log_imports_and_diagnoses_in_under_5_seconds(tmp_path):
    store = tmp_path / "s.sqlite"
    t0 = time.perf_counter()
    import_run(PYTHIA / "pythia-14m-1.csv.gz", mapping={"loss": "train/lm_loss"}, run_name="p", store=store)
    d = diagnose_run(str(store), "p")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    assert any(e.kind == "loss_regression" for e in d.events)
