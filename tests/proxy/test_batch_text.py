"""Proxy-lab batch attribution: the ids the loop records, their text, and `seismo diagnose` showing it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seismo.cli import main
from seismo.proxy import train
from seismo.proxy.batch_text import POISONED, batch_record, batch_sequences, train_offsets
from seismo.proxy.data import TokenDataset
from seismo.proxy.presets import get_preset
from seismo.store import RunStore
from seismo.store.batches import BatchRecord, batch_at, batch_steps

CORPUS = bytes(range(32, 127)) * 40 + b"def hello():\n    return 'world'\n" * 20


def test_offsets_are_the_sequences_the_dataset_draws():
    ds = TokenDataset(CORPUS, 0.1, {})
    for step in (0, 7, 123):
        x, y = ds.batch("train", 3, step, 5, 16)
        off = train_offsets(ds, 3, step, 5, 16)
        for i in range(5):
            assert bytes(x[i].tolist()) == bytes(ds.train[off[i]: off[i] + 16].tolist())
            assert y[i].tolist() == ds.train[off[i] + 1: off[i] + 17].tolist()


def test_sample_losses_average_to_the_batch_loss_and_poison_gets_minus_one():
    ds = TokenDataset(CORPUS, 0.1, {})
    x, y = ds.batch("train", 0, 4, 6, 12)
    logits = torch.randn(6, 12, 256)
    rec = batch_record(ds, 0, 4, 12, logits, y, poisoned=False)
    ref = torch.stack([F.cross_entropy(logits[i], y[i]) for i in range(6)])  # one sequence at a time
    torch.testing.assert_close(rec["sample_losses"], ref)
    torch.testing.assert_close(rec["sample_losses"].mean(), F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    assert rec["batch_ids"].tolist() == train_offsets(ds, 0, 4, 6, 12).tolist()
    assert batch_record(ds, 0, 4, 12, logits, y, poisoned=True)["batch_ids"].tolist() == [POISONED] * 6


def test_text_is_escaped_truncated_and_sorted_by_loss():
    cfg = get_preset("tiny")
    cfg.seq_len = 16
    ds = TokenDataset(CORPUS, 0.1, {})
    off = int((ds.train == ord("\n")).nonzero()[0]) - 5  # a sequence with a newline in its first 12 characters
    rec = BatchRecord(5, [0, off], [1.0, 4.0])
    seqs = batch_sequences(cfg.to_dict(), {}, rec, max_chars=12, dataset=ds)
    assert [s.position for s in seqs] == [1, 0]  # highest loss first
    expect = bytes(ds.train[off: off + 16].tolist()).decode().replace("\n", "\\n")
    assert seqs[0].text == expect[:12] + "..." and "\n" not in seqs[0].text
    assert seqs[1].text == bytes(ds.train[0:12].tolist()).decode() + "..."


def test_poisoned_batch_is_shown_by_seismo_diagnose(tmp_path, capsys):
    cfg = get_preset("tiny")
    cfg.steps, cfg.checkpoint_every, cfg.eval_every, cfg.monitor = 26, 0, 0, "minimal"
    cfg.out_dir, cfg.store, cfg.run_name = str(tmp_path / "p"), str(tmp_path / "seismo.sqlite"), "p"
    cfg.spikes.poison_steps = [22]
    r = train(cfg)
    assert r.train_loss[22] > r.train_loss[21] + 2.0  # random tokens: ~log(256) and more
    with RunStore(cfg.store) as st:
        rid = st.find_run("p").run_id
        assert batch_steps(st, rid) == list(range(26))
        poisoned, clean = batch_at(st, rid, 22), batch_at(st, rid, 21)
    assert poisoned.ids == [POISONED] * cfg.batch_size
    assert min(poisoned.losses) > max(clean.losses)
    assert sum(poisoned.losses) / cfg.batch_size == pytest.approx(float(r.train_loss[22]), rel=1e-4)
    assert main(["diagnose", "p", "--store", cfg.store]) == 0
    out = capsys.readouterr().out
    assert "Batch of the loss spike at step 22" in out
    assert out.count("poisoned (random tokens)") == 4  # the four highest-loss sequences
