"""The Monitor under FSDP2 (``fully_shard``): 2 CPU processes with gloo, TinyGPT.

FSDP2 turns every parameter and gradient into a DTensor sharded on dim 0. Each rank trains on its
half of a fixed batch; FSDP2 averages the gradients (reduce-scatter), so the sharded gradient is
the full-batch gradient. The reference is the same model, unsharded, trained in one process on the
full batch (computed in each worker, before sharding). Every gradient / parameter / update norm,
global and per module, must equal the reference's (rel 1e-6), on both ranks, and the attention
probe must record its signals. A tensor-parallel DTensor parameter (Replicate placement) must be
counted once, not once per rank.

The Adam probe and the Adam staleness probe read DTensor optimizer state: every ``adam/*`` signal
(update RMS, ratio std, bimodal and eps-dominated fractions, update/gradient cosine, l1 and max of
v, stale fractions) must equal the unsharded run's (rel 1e-6), on both ranks, with no probe
disabled. One exception, measured: the stale fraction of ``attn.c_attn`` may differ by up to
``n_embd`` coordinates (the key bias): softmax is invariant to a shift of the keys' bias, so its
true gradient is 0 and the computed one is rounding noise (~1e-12), different for a full-batch and
two half-batch reductions, and whether noise is "10x below its RMS" is arbitrary. Everywhere else the
counts agree exactly.

Tensor parallel: a 2-layer MLP under ``parallelize_module`` (``ColwiseParallel`` /
``RowwiseParallel``: parameters sharded on dim 0, on dim 1, and a replicated bias) must record the
same gradient, parameter, update and Adam signals as the unsharded MLP (rel 1e-6), on both ranks.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from seismo.monitor import Monitor
from seismo.proxy.model import GPTConfig, TinyGPT

WORLD = 2
STEPS = 3
CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
NORMS = ("grad/norm", "param/norm", "update/norm", "grad/norm/", "grad/rms/", "param/norm/", "update/ratio/")
ADAM = ("adam/update_rms/", "adam/ratio_std/", "adam/ratio_bimodal/", "adam/eps_dominated/", "adam/update_grad_cos",
        "adam/v_l1", "adam/v_max", "adam/stale_frac")
NOISY = "adam/stale_frac"  # the key bias's zero gradient is rounding noise (module docstring)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def train(model, tokens_of, steps: int) -> tuple[dict[str, list[float]], list[str]]:
    from seismo.monitor.adam_staleness import AdamStalenessProbe
    from seismo.monitor.presets import build_probes
    from seismo.monitor.tracking import every

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probes = build_probes("full") + [AdamStalenessProbe(schedule=every(1))]
        mon = Monitor(model, opt, probes=probes, flush_every=1)
        for step in range(steps):
            tok = tokens_of(step)
            logits, _ = model(tok[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tok[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss)
        mon.close()
    disabled = [str(w.message) for w in caught if "probe" in str(w.message).lower()]
    return {n: vs for n, (_, vs) in mon.history.items()}, disabled


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def train_mlp(model, steps: int = STEPS) -> tuple[dict[str, list[float]], list[str]]:
    from seismo.monitor.adam import AdamProbe
    from seismo.monitor.adam_staleness import AdamStalenessProbe
    from seismo.monitor.gradients import GradientProbe, UpdateProbe
    from seismo.monitor.tracking import every

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probes = [GradientProbe(schedule=every(1)), UpdateProbe(schedule=every(1)), AdamProbe(schedule=every(1)),
                  AdamStalenessProbe(schedule=every(1))]
        mon = Monitor(model, opt, probes=probes, flush_every=1)
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mon.step(loss)
        mon.close()
    return {n: vs for n, (_, vs) in mon.history.items()}, [str(w.message) for w in caught]


def _worker(rank: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rdzv')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = TinyGPT(CFG)
        reference = train(copy.deepcopy(model), batch, STEPS)  # one process, full batch, plain tensors
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        half = slice(rank * 2, rank * 2 + 2)
        sharded = train(model, lambda s: batch(s)[half], STEPS)

        # tensor-parallel style: a Replicate DTensor parameter (every rank holds the whole tensor)
        from seismo.monitor.gradients import _ShardedSums
        mesh = init_device_mesh("cpu", (WORLD,))
        w = torch.nn.Parameter(distribute_tensor(torch.full((3, 4), 2.0), mesh, [Replicate()]))
        replicated_sq = _ShardedSums([w])(torch.tensor([[48.0]])).item()  # 12 entries of 2.0 squared
        # the Adam probes' reduction: sums over a replicated parameter counted once, a max is a max
        from seismo.monitor.adam import ShardedReduce
        sums, maxes = ShardedReduce([w])(torch.tensor([[12.0]]), torch.tensor([float(rank)]))

        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        torch.manual_seed(0)
        mlp = _MLP()
        tp_reference = train_mlp(copy.deepcopy(mlp))
        parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
        tp = train_mlp(mlp)
        torch.save({"reference": reference, "sharded": sharded, "replicated_sq": replicated_sq,
                    "replicated_reduce": (sums.item(), maxes.item()), "tp_reference": tp_reference, "tp": tp,
                    "tp_placements": sorted({str(p.placements) for p in mlp.parameters()})},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("fsdp_monitor")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_tensor_parallel_signals_equal_the_unsharded_run(results):
    r0, r1 = results
    ref, ref_warnings = r0["tp_reference"]
    assert r0["tp_placements"] == ["(Replicate(),)", "(Shard(dim=0),)", "(Shard(dim=1),)"]
    assert {"grad/norm/up", "update/ratio/down", "adam/update_rms/down", "adam/v_max", "adam/stale_frac"} <= set(ref)
    for r in (r0, r1):
        got, caught = r["tp"]
        assert caught == ref_warnings == []
        assert set(got) == set(ref)
        for n in ref:
            for a, b in zip(got[n], ref[n], strict=True):
                assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (n, a, b)


def test_fsdp2_norms_equal_the_unsharded_run(results):
    r0, r1 = results
    ref, ref_disabled = r0["reference"]
    assert ref_disabled == []
    names = [n for n in ref if n.startswith(NORMS)]
    assert "grad/norm/transformer.h.0.attn.c_attn" in names and "update/ratio/lm_head" in names
    adam = [n for n in ref if n.startswith(ADAM)]
    assert "adam/update_rms/transformer.h.0.attn.c_attn" in adam and "adam/stale_frac/lm_head" in adam
    numel = {m: sum(p.numel() for p in mod.parameters(recurse=False)) for m, mod in TinyGPT(CFG).named_modules()}
    total = sum(numel.values())
    for r in (r0, r1):
        r["sharded"], disabled = r["sharded"]
        assert disabled == [], disabled  # no probe gave up on DTensor state
        assert r["replicated_sq"] == 48.0  # counted once, not once per rank
        assert r["replicated_reduce"] == (12.0, 1.0)  # a sum counted once; the max over the ranks' 0 and 1
        for n in adam:
            assert n in r["sharded"] and len(r["sharded"][n]) == STEPS, n
            for a, b in zip(r["sharded"][n], ref[n]):
                tol = 0.0
                if n == NOISY:
                    tol = CFG.n_layer * CFG.n_embd / total
                elif n.startswith(NOISY) and n.endswith("attn.c_attn"):
                    tol = CFG.n_embd / numel[n.split("/")[-1]]
                assert math.isclose(a, b, rel_tol=1e-6, abs_tol=max(tol, 1e-12)), (n, a, b)
        for n in names:
            assert n in r["sharded"], n
            for a, b in zip(r["sharded"][n], ref[n]):
                assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12), (n, a, b)
        attn = [n for n in r["sharded"] if n.startswith("attn/logit_max/")]
        assert len(attn) == CFG.n_layer and all(len(r["sharded"][n]) == STEPS for n in attn)
    assert all(r0["sharded"][n] == r1["sharded"][n] for n in names + adam)  # every rank records the same values
