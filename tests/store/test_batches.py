"""The run store's batches table and Monitor.step(batch_ids=...)."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch
import torch.nn as nn

from seismo.errors import ConfigError
from seismo.monitor import Monitor
from seismo.store import RunStore
from seismo.store.batches import batch_at, batch_steps, log_batches


def test_rows_round_trip_newest_wins_and_nan_is_none(tmp_path):
    with RunStore(tmp_path / "s.sqlite") as st:
        rid = st.create_run("r")
        assert batch_at(st, rid, 0) is None and batch_steps(st, rid) == []  # no table yet: nothing, no error
        log_batches(st, rid, [(0, [5, 9], [1.5, math.nan]), (1, [3], None)])
        log_batches(st, rid, [(1, [4, 7], [0.25, 0.5])])  # a resumed run re-records step 1
        b0, b1 = batch_at(st, rid, 0), batch_at(st, rid, 1)
        assert (b0.ids, b0.losses) == ([5, 9], [1.5, None])
        assert (b1.ids, b1.losses) == ([4, 7], [0.25, 0.5])
        assert batch_steps(st, rid) == [0, 1] and batch_at(st, rid, 2) is None


def test_length_mismatch_is_refused_and_nothing_written(tmp_path):
    with RunStore(tmp_path / "s.sqlite") as st:
        rid = st.create_run("r")
        with pytest.raises(ValueError, match="step 3 has 2 ids but 1 losses"):
            log_batches(st, rid, [(2, [1], None), (3, [1, 2], [0.1])])
        assert batch_steps(st, rid) == []


def test_deleting_a_run_deletes_its_batches(tmp_path):
    path = tmp_path / "s.sqlite"
    with RunStore(path) as st:
        a, b = st.create_run("a"), st.create_run("b")
        log_batches(st, a, [(0, [1], None)])
        log_batches(st, b, [(0, [2], None)])
        st.delete_run(a)
        assert batch_at(st, b, 0).ids == [2]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT run_id, ids_json FROM batches").fetchall() == [(b, "[2]")]
    finally:
        conn.close()


def _loop(tmp_path, steps, ids_of, losses_of=None, flush_every=3):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, store=str(tmp_path / "s.sqlite"), run_name="m", probes="minimal", flush_every=flush_every)
    for step in range(steps):
        x = torch.randn(3, 4)
        per = (model(x).squeeze(1) - 1.0) ** 2
        loss = per.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(loss, batch_ids=ids_of(step), sample_losses=None if losses_of is None else losses_of(step, per))
    mon.close()
    return mon.run_id


def test_monitor_stores_each_steps_ids_and_losses(tmp_path):
    kept = {}

    def losses_of(step, per):
        kept[step] = per.detach().tolist()
        return per

    rid = _loop(tmp_path, 7, lambda s: torch.tensor([10 * s, 10 * s + 1, 10 * s + 2]), losses_of)
    with RunStore(tmp_path / "s.sqlite") as st:
        assert batch_steps(st, rid) == list(range(7))  # 7 steps, flushes every 3 steps and at close
        for s in range(7):
            b = batch_at(st, rid, s)
            assert b.ids == [10 * s, 10 * s + 1, 10 * s + 2]
            assert b.losses == pytest.approx(kept[s], rel=1e-6)


def test_monitor_accepts_a_list_and_copies_a_tensor_that_is_reused(tmp_path):
    buf = torch.zeros(2, dtype=torch.int64)

    def ids_of(step):
        if step % 2:
            return [step, -step]
        buf.fill_(step)  # the caller overwrites its buffer before the flush
        return buf

    rid = _loop(tmp_path, 4, ids_of)
    with RunStore(tmp_path / "s.sqlite") as st:
        assert [batch_at(st, rid, s).ids for s in range(4)] == [[0, 0], [1, -1], [2, 2], [3, -3]]
        assert batch_at(st, rid, 0).losses is None


@pytest.mark.parametrize("ids, losses, match", [
    (torch.zeros(2, 2, dtype=torch.int64), None, "batch_ids: .*1-D"),
    (torch.zeros(2), None, "batch_ids: .*integer"),
    ([1, 2], [0.5], "sample_losses: .*one loss per batch id"),
])
def test_bad_batch_ids_are_a_one_line_config_error(tmp_path, ids, losses, match):
    model = nn.Linear(2, 1)
    mon = Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), probes="minimal")
    with pytest.raises(ConfigError, match=match):
        mon.step(1.0, batch_ids=ids, sample_losses=losses)
    mon.close()


def test_a_store_failure_turns_batch_recording_off_with_one_warning(tmp_path, monkeypatch):
    import seismo.monitor.monitor as mm

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(mm, "log_batches", boom)
    with pytest.warns(RuntimeWarning, match="batch ids are no longer recorded.*disk on fire") as rec:
        _loop(tmp_path, 7, lambda s: [s], flush_every=2)
    assert sum("batch ids" in str(w.message) for w in rec) == 1
