"""The proxy lab's batches as data: what identifies each training sequence, and its text.

A proxy-lab training sequence is identified by its start offset in the training split of the
byte corpus (what :meth:`seismo.proxy.data.TokenDataset.batch` samples); a sequence of a
``spikes.poison_steps`` batch (random tokens, :func:`seismo.proxy.train.poison_batch`) gets id -1.
The training loop passes these ids and each sequence's loss (B floats, from the logits it already
has) to ``Monitor.step``; :func:`batch_sequences` turns a stored batch back into text, so
``seismo diagnose`` can show what the model saw at a loss spike (PaLM, arXiv 2204.02311, traced
its spikes to particular batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from seismo.events import Event
from seismo.proxy.data import Dataset, TokenDataset, _generator, load_dataset
from seismo.store.batches import BatchRecord, batch_at
from seismo.store.run_store import RunStore

__all__ = ["POISONED", "SequenceText", "train_offsets", "batch_record", "batch_sequences", "spike_batches"]

POISONED = -1  # the id of a sequence of random tokens (spikes.poison_steps)


@dataclass(frozen=True)
class SequenceText:
    """One sequence of a stored batch: its position in the batch, id (corpus offset or -1), loss, text."""

    position: int
    id: int
    loss: float | None
    text: str


def train_offsets(ds: Dataset, seed: int, step: int, batch_size: int, seq_len: int) -> Tensor | None:
    """The corpus offsets (in the training split) of step ``step``'s training batch: the indices
    :meth:`TokenDataset.batch` draws, from the same seeded generator (None for other datasets)."""
    if not isinstance(ds, TokenDataset):
        return None
    return torch.randint(len(ds.train) - seq_len - 1, (batch_size,), generator=_generator(seed, step, "train"))


def batch_record(ds: Dataset, seed: int, step: int, seq_len: int, logits: Tensor, y: Tensor, poisoned: bool) -> dict:
    """``Monitor.step`` keyword arguments for a proxy-lab step: ``batch_ids`` (offsets, or -1 for a
    poisoned batch) and ``sample_losses`` (each sequence's mean cross-entropy, targets -1 ignored).
    Empty for datasets without offsets. No host sync: everything stays on the device."""
    ids = train_offsets(ds, seed, step, y.shape[0], seq_len)
    if ids is None:
        return {}
    if poisoned:
        ids = torch.full_like(ids, POISONED)
    with torch.no_grad():
        ce = F.cross_entropy(logits.detach().float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)
        per = ce.sum(1) / (y != -1).sum(1).clamp_min(1)
    return dict(batch_ids=ids, sample_losses=per)


def _text(tokens: list[int], max_chars: int) -> str:
    raw = bytes(tokens).decode("utf-8", errors="replace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)  # a newline shows as \\n
    return shown if len(shown) <= max_chars else shown[:max_chars] + "..."


def batch_sequences(config: dict, meta: dict, record: BatchRecord, *, max_chars: int = 120,
                    dataset: Dataset | None = None) -> list[SequenceText]:
    """The sequences of a stored proxy-lab batch as text (control characters escaped, truncated to
    ``max_chars``), highest loss first when losses were recorded. ``config`` is the run's stored
    ``TrainConfig`` dict, ``meta`` its metadata (the corpus hash is checked: text from another
    corpus would be wrong). Raises ValueError when the batch cannot be decoded."""
    from seismo.proxy.train import TrainConfig, poison_batch  # train imports this module: a cycle-free lazy load

    cfg = TrainConfig.from_dict(config)
    seq_len = cfg.seq_len or cfg.model.block_size
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    if not isinstance(ds, TokenDataset):
        raise ValueError("batch text: only byte-corpus runs have text")
    want = (meta.get("data") or {}).get("sha256")
    if want and want != ds.meta.get("sha256"):
        raise ValueError(f"batch text: the corpus here (sha256 {ds.meta.get('sha256', '?')[:12]}) is not the run's ({want[:12]})")
    rows = []
    poison_x = None
    for i, ident in enumerate(record.ids):
        if ident == POISONED:
            if poison_x is None:
                shape = torch.zeros(len(record.ids), seq_len, dtype=torch.int64)
                poison_x, _ = poison_batch(shape, shape, cfg.seed, record.step, cfg.model.vocab_size)
            tokens = poison_x[i].tolist()
        else:
            tokens = ds.train[ident: ident + seq_len].tolist()
        loss = record.losses[i] if record.losses is not None else None
        rows.append(SequenceText(i, ident, loss, _text(tokens, max_chars)))
    if record.losses is not None:
        rows.sort(key=lambda r: -r.loss if r.loss is not None else float("inf"))
    return rows



SPIKE_SEVERITIES = ("warning", "critical")  # loss spikes whose batch ``seismo diagnose`` shows first


def _spikes_to_show(events: Sequence[Event]) -> list[Event]:
    """Warning-or-worse loss spikes in step order, then isolated outliers (info), tallest first."""
    spikes = [e for e in events if e.kind == "loss_spike" and e.step is not None]
    bad = [e for e in spikes if e.severity in SPIKE_SEVERITIES]
    outliers = sorted((e for e in spikes if e.severity not in SPIKE_SEVERITIES),
                      key=lambda e: -float((e.evidence or {}).get("peak_excess") or 0.0))
    return bad + outliers


def spike_batches(store: RunStore, run: str | int, events: Sequence[Event], *, limit: int = 3,
                  max_chars: int = 120) -> list[tuple[Event, list[SequenceText] | str]]:
    """The batches of ``run``'s loss spikes whose onset step has a recorded batch: every
    warning-or-worse spike first, then the tallest isolated outliers, ``limit`` in all. Each is the
    batch's sequences (highest loss first) or, when they cannot be decoded, the reason. Empty for
    runs recorded without batch ids."""
    info = store.find_run(run)
    out: list[tuple[Event, list[SequenceText] | str]] = []
    ds: Dataset | None = None
    for e in _spikes_to_show(events):
        if len(out) >= limit:
            break
        record = batch_at(store, info.run_id, int(e.step))
        if record is None:
            continue
        try:
            if ds is None:
                from seismo.proxy.train import TrainConfig  # train imports this module: a cycle-free lazy load

                ds = load_dataset(TrainConfig.from_dict(info.config).data)
            out.append((e, batch_sequences(info.config, info.meta, record, max_chars=max_chars, dataset=ds)))
        except (ValueError, OSError) as exc:
            out.append((e, str(exc)))
    return out
