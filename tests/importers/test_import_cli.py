"""``seismo import`` then ``seismo diagnose``, in-process, as a user would run them."""

from __future__ import annotations

import json

import numpy as np

from seismo.cli import main


def test_import_then_diagnose_a_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = 3.0 + 0.02 * rng.standard_normal(3000)
    x[2000:2600] += np.minimum(np.arange(600) / 300, 1.0) * 0.3  # a slow climb of 0.3 nats (no single jump)
    src = tmp_path / "log.csv"
    src.write_text("iter,train/lm_loss\n" + "".join(f"{i},{float(v)!r}\n" for i, v in enumerate(x)))
    store = tmp_path / "s.sqlite"
    assert main(["import", str(src), "--map", "loss=train/lm_loss", "--map", "step=iter", "--run", "mine", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "as run 1" in out and "1 signals, up to 3000 steps" in out
    assert main(["diagnose", "mine", "--store", str(store), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["cause_kind"] == "loss_regression" and d["first_step"] >= 2000


def test_a_bad_file_is_one_line_exit_2_and_no_store(tmp_path, capsys):
    src = tmp_path / "bad.csv"
    src.write_text("step,loss\n0,1.0\n1,x\n")
    store = tmp_path / "s.sqlite"
    assert main(["import", str(src), "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"seismo: error: {src}:3:loss: column 'loss': 'x' is not a number"
    assert not store.exists()
