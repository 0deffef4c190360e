"""Embedded data (seismo.proxy.data): deterministic corpora, disjoint splits, batches that are a
pure function of (seed, step), and the modular-arithmetic task of Prieto et al. 2025."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from seismo.proxy.data import DataConfig, ModularDataset, TokenDataset, load_dataset, stdlib_corpus
from seismo.proxy.model import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# stdlib corpus
# --------------------------------------------------------------------------------------
def test_stdlib_corpus_is_deterministic():
    a = stdlib_corpus(200_000)
    b = stdlib_corpus(200_000)
    assert len(a) == 200_000
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    assert stdlib_corpus(300_000)[:200_000] == a  # a longer corpus extends the shorter one
    ds1 = load_dataset(DataConfig(source="stdlib", max_bytes=200_000))
    ds2 = load_dataset(DataConfig(source="stdlib", max_bytes=200_000))
    assert ds1.meta["sha256"] == ds2.meta["sha256"] == hashlib.sha256(a).hexdigest()
    assert ds1.meta["source"] == "stdlib" and ds1.meta["n_bytes"] == 200_000
    assert torch.equal(ds1.train, ds2.train) and torch.equal(ds1.val, ds2.val)


# --------------------------------------------------------------------------------------
# Token datasets: splits and batches
# --------------------------------------------------------------------------------------
def chunked_bytes(n_chunks: int = 100, chunk: int = 256) -> bytes:
    """Chunk i is ``chunk`` copies of byte i, so a token tells which chunk it came from."""
    return bytes(i for i in range(n_chunks) for _ in range(chunk))


def test_train_val_are_disjoint_chunks():
    ds = TokenDataset(chunked_bytes(), val_frac=0.1, meta={}, chunk=256)
    assert len(ds.train) + len(ds.val) == 100 * 256
    train_chunks, val_chunks = set(ds.train.tolist()), set(ds.val.tolist())
    assert train_chunks.isdisjoint(val_chunks)
    assert val_chunks == set(range(9, 100, 10))  # every 10th chunk is validation
    assert train_chunks | val_chunks == set(range(100))
    # whole chunks, in corpus order
    assert ds.val.tolist() == [i for i in range(9, 100, 10) for _ in range(256)]


def random_bytes(n: int = 50_000, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def test_batches_are_a_pure_function_of_seed_and_step():
    ds = TokenDataset(random_bytes(), val_frac=0.05, meta={})
    x1, y1 = ds.batch("train", seed=3, step=17, batch_size=4, seq_len=32)
    for s in range(5):  # other batches in between do not matter
        ds.batch("train", seed=3, step=s, batch_size=4, seq_len=32)
    x2, y2 = TokenDataset(random_bytes(), val_frac=0.05, meta={}).batch("train", 3, 17, 4, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, ds.batch("train", 3, 18, 4, 32)[0])
    assert not torch.equal(x1, ds.batch("train", 4, 17, 4, 32)[0])
    assert not torch.equal(ds.batch("val", 3, 17, 4, 32)[0], x1)
    assert x1.shape == y1.shape == (4, 32) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens


def test_batches_are_windows_of_their_split():
    ds = TokenDataset(chunked_bytes(), val_frac=0.1, meta={}, chunk=256)
    val_chunks = set(range(9, 100, 10))
    for step in range(5):
        xt, _ = ds.batch("train", 0, step, 8, 64)
        xv, _ = ds.batch("val", 0, step, 8, 64)
        assert set(xt.flatten().tolist()).isdisjoint(val_chunks)
        assert set(xv.flatten().tolist()) <= val_chunks


def test_split_too_small_for_seq_len_raises():
    ds = TokenDataset(random_bytes(4096), val_frac=0.1, meta={})
    with pytest.raises(ConfigError, match="^data:"):
        ds.batch("val", 0, 0, 2, len(ds.val))


# --------------------------------------------------------------------------------------
# text source
# --------------------------------------------------------------------------------------
def test_text_source_from_file(tmp_path):
    data = random_bytes(10_000, seed=1)
    f = tmp_path / "corpus.bin"
    f.write_bytes(data)
    ds = load_dataset(DataConfig(source="text", path=str(f), val_frac=0.1))
    assert ds.vocab_size == 256
    assert ds.meta["source"] == "text" and ds.meta["n_bytes"] == 10_000
    assert ds.meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(torch.cat([ds.train, ds.val]).tolist()) == sorted(data)
    capped = load_dataset(DataConfig(source="text", path=str(f), max_bytes=4096))
    assert capped.meta["sha256"] == hashlib.sha256(data[:4096]).hexdigest()


def test_text_source_from_directory_reads_files_in_path_order(tmp_path):
    a, b, c = random_bytes(3000, 1), random_bytes(3000, 2), random_bytes(3000, 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b)
    (tmp_path / "sub" / "c.txt").write_bytes(c)
    (tmp_path / "a.txt").write_bytes(a)
    ds = load_dataset(DataConfig(source="text", path=str(tmp_path)))
    assert ds.meta["sha256"] == hashlib.sha256(a + b + c).hexdigest()


def test_text_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="^data.path:"):
        load_dataset(DataConfig(source="text", path=""))
    with pytest.raises(ConfigError, match="^data.path:"):
        load_dataset(DataConfig(source="text", path=str(tmp_path / "missing")))
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="^data.path:"):
        load_dataset(DataConfig(source="text", path=str(small)))


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(source="web"), "data.source"),
        (dict(max_bytes=10), "data.max_bytes"),
        (dict(val_frac=0.5), "data.val_frac"),
        (dict(p=1), "data.p"),
        (dict(op="div"), "data.op"),
        (dict(train_frac=1.0), "data.train_frac"),
    ],
)
def test_data_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        DataConfig(**kw).validate()


# --------------------------------------------------------------------------------------
# modular arithmetic (Prieto et al. 2025; Power et al. 2022)
# --------------------------------------------------------------------------------------
P = 113


def all_rows(ds: ModularDataset):
    return torch.cat([ds.x["train"], ds.x["val"]]), torch.cat([ds.y["train"], ds.y["val"]])


def test_modular_has_all_pairs_once():
    ds = ModularDataset(P, "add", 0.4, 0)
    x, y = all_rows(ds)
    assert x.shape == (P * P, 3) and y.shape == (P * P, 3)
    pairs = set(map(tuple, x[:, :2].tolist()))
    assert pairs == set(itertools.product(range(P), range(P)))
    assert (x[:, 2] == P).all()  # the '=' token
    assert ds.vocab_size == P + 1


@pytest.mark.parametrize(
    "op, fn", [("add", lambda a, b: (a + b) % P), ("sub", lambda a, b: (a - b) % P), ("mul", lambda a, b: (a * b) % P)]
)
def test_modular_labels(op, fn):
    ds = ModularDataset(P, op, 0.3, 1)
    x, y = all_rows(ds)
    for (a, b, _), (y0, y1, c) in zip(x.tolist(), y.tolist()):
        assert (y0, y1) == (-1, -1)
        assert c == fn(a, b)


@pytest.mark.parametrize("frac", [0.3, 0.4, 0.7])
def test_modular_split_sizes(frac):
    ds = ModularDataset(P, "add", frac, 0)
    n_train = round(frac * P * P)
    assert len(ds.x["train"]) == n_train and len(ds.x["val"]) == P * P - n_train
    assert ds.meta["n_train"] == n_train and ds.meta["n_val"] == P * P - n_train


def test_modular_split_is_deterministic():
    a, b, c = ModularDataset(P, "add", 0.4, 0), ModularDataset(P, "add", 0.4, 0), ModularDataset(P, "add", 0.4, 1)
    assert torch.equal(a.x["train"], b.x["train"]) and torch.equal(a.x["val"], b.x["val"])
    assert not torch.equal(a.x["train"], c.x["train"])
    tr = set(map(tuple, a.x["train"].tolist()))
    va = set(map(tuple, a.x["val"].tolist()))
    assert tr.isdisjoint(va)


def test_modular_full_batch_and_minibatch():
    ds = load_dataset(DataConfig(source="modular", p=P, train_frac=0.4))
    x, y = ds.batch("train", 0, 0, 0, 3)  # batch_size 0: the full split
    assert torch.equal(x, ds.x["train"]) and torch.equal(y, ds.y["train"])
    x, _ = ds.batch("train", 0, 5, 10**6, 3)  # larger than the split: also the full split
    assert torch.equal(x, ds.x["train"])
    xb, yb = ds.batch("train", 0, 5, 64, 3)
    assert xb.shape == (64, 3)
    assert len(set(map(tuple, xb.tolist()))) == 64  # without replacement
    assert set(map(tuple, xb.tolist())) <= set(map(tuple, ds.x["train"].tolist()))
    assert torch.equal(xb, ds.batch("train", 0, 5, 64, 3)[0])
    assert not torch.equal(xb, ds.batch("train", 0, 6, 64, 3)[0])
