"""The proxy training loop (seismo.proxy.train) and its schedules, losses and presets.

* a golden-loss test pins the first 50 steps of a seeded run (plus a sanity check that does not
  come from our own output: the step-0 loss of an untrained byte model is ln 256);
* checkpoint/resume reproduces an uninterrupted run bitwise;
* divergence ends a run cleanly;
* independent weight decay, z-loss, sequence-length warm-up and the LR schedules are checked
  against closed-form formulas (METHODS.md §1.1, §1.5, §7).
"""

from __future__ import annotations

import importlib
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from seismo.mitigate.losses import z_loss
from seismo.mitigate.schedules import lr_at, seqlen_warmup, warmup_constant, warmup_cosine, warmup_linear
from seismo.proxy.data import load_dataset
from seismo.proxy.model import ConfigError, GPTConfig, TinyGPT
from seismo.proxy.presets import PRESETS, get_preset
from seismo.proxy.train import OptimConfig, TrainConfig, build_optimizer, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# the module, not the function ``seismo.proxy.train`` that the package re-exports under that name
train_mod = importlib.import_module("seismo.proxy.train")

WORDS = ["the", "model", "loss", "spike", "attention", "logit", "norm", "grad",
         "adam", "step", "warm", "up", "decay", "layer", "head", "token"]


def synthetic_text(n_words: int = 6000, seed: int = 12345) -> bytes:
    """A deterministic pseudo-English text from a fixed LCG (no dependence on the machine)."""
    x, out = seed, []
    for _ in range(n_words):
        x = (1103515245 * x + 12345) % 2**31
        out.append(WORDS[(x >> 16) % len(WORDS)] + ("." if (x >> 8) % 11 == 0 else ""))
        if (x >> 4) % 17 == 0:
            out.append("\n")
    return " ".join(out).encode()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(synthetic_text())
    return str(path)


def small_cfg(corpus: str, **kw) -> TrainConfig:
    """d=32, 2 layers, 2 heads, T=32, B=8 on the synthetic text; no monitor, no files."""
    cfg = TrainConfig(steps=50, batch_size=8, eval_every=0, eval_batches=1, log_every=10, monitor="none")
    cfg.data.source = "text"
    cfg.data.path = corpus
    cfg.model.n_embd = 32
    cfg.model.n_head = 2
    cfg.model.n_layer = 2
    cfg.model.block_size = 32
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 10
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# --------------------------------------------------------------------------------------
# Golden loss
# --------------------------------------------------------------------------------------
GOLDEN = [
    5.556056022644043, 5.460681438446045, 5.297807693481445, 5.149277210235596, 4.961172103881836,
    4.7431206703186035, 4.465728759765625, 4.160492420196533, 3.8198049068450928, 3.490934371948242,
    3.239387273788452, 3.049936294555664, 2.8878061771392822, 2.825363874435425, 2.82307505607605,
    2.730480194091797, 2.8626673221588135, 2.6394503116607666, 2.737103223800659, 2.727104425430298,
    2.640094757080078, 2.5571110248565674, 2.5608346462249756, 2.4515528678894043, 2.38916015625,
    2.358198642730713, 2.3781182765960693, 2.24526047706604, 2.241741418838501, 2.212743043899536,
    2.2137138843536377, 2.1738247871398926, 2.187739133834839, 2.113650321960449, 2.163236141204834,
    2.0765485763549805, 2.0115907192230225, 2.0814099311828613, 2.0636181831359863, 2.014861583709717,
    2.0085060596466064, 2.0082905292510986, 2.0467019081115723, 2.0100061893463135, 2.02801775932312,
    1.9802271127700806, 1.9783976078033447, 2.003431558609009, 1.9640389680862427, 1.9422954320907593,
]


def test_golden_loss_first_50_steps(corpus):
    r = train(small_cfg(corpus))
    assert r.status == "completed" and r.steps_done == 50
    # Independent of our own output: an untrained model with small logits predicts ~uniformly
    # over 256 bytes, and training on a 16-word text must drive the loss down.
    assert r.train_loss[0] == pytest.approx(math.log(256), abs=0.05)
    assert r.train_loss[-10:].mean() < r.train_loss[:5].mean() - 2.0
    np.testing.assert_allclose(r.train_loss, GOLDEN, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Checkpoint / resume
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("monitor", ["none", "default"])
def test_interrupted_and_resumed_run_is_bitwise_identical(corpus, tmp_path, monitor):
    def cfg_for(name: str) -> TrainConfig:
        cfg = small_cfg(corpus, steps=30, eval_every=10, monitor=monitor, out_dir=str(tmp_path / name),
                        store=str(tmp_path / "store.sqlite"), run_name=name)
        cfg.model.dropout = 0.1  # consumes the global RNG, so its state must be restored too
        return cfg

    full = train(cfg_for("full"))
    assert full.status == "completed"

    cfg = cfg_for("resumed")
    cfg.stop_at = 13
    part = train(cfg)
    assert part.status == "interrupted" and part.steps_done == 13
    ckpt = tmp_path / "resumed" / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain tensors and containers
    assert state["step"] == 13
    assert set(state) >= {"model", "optim", "rng", "losses"}
    assert load_checkpoint(ckpt)["step"] == 13

    cfg.stop_at = 0
    resumed = train(cfg, resume=True)
    assert resumed.status == "completed" and resumed.steps_done == 30
    assert np.array_equal(resumed.train_loss, full.train_loss)  # bitwise
    assert resumed.val_loss == full.val_loss
    assert resumed.final_val_loss == full.final_val_loss
    if monitor == "default":
        assert resumed.run_id == part.run_id  # the resumed run keeps writing into the same stored run
        for name in ("grad/norm", "attn/logit_max/transformer.h.1.attn", "logits/logz_mean"):
            s_full, v_full = full.series(name)
            s_res, v_res = resumed.series(name)
            after = s_full >= 13
            assert np.array_equal(s_res, s_full[after])
            assert np.array_equal(v_res, v_full[after]), name


def _stored_rows(store_path, run_id) -> list[tuple]:
    """Every (step, name, value) row of a run, read with plain sqlite3 (not the store's code)."""
    conn = sqlite3.connect(store_path)
    try:
        return conn.execute("SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY name, step", (run_id,)).fetchall()
    finally:
        conn.close()


def test_checkpoint_is_written_only_after_the_rows_of_its_steps_are_committed(corpus, tmp_path, monkeypatch):
    store = tmp_path / "store.sqlite"
    cfg = small_cfg(corpus, steps=30, eval_every=0, monitor="default", out_dir=str(tmp_path / "r"), store=str(store),
                    checkpoint_every=10, log_every=3)  # the monitor flushes every 3 steps, checkpoints fall in between
    seen = []
    real_save = train_mod.save_checkpoint

    def checking_save(path, state):
        if state["run_id"] is not None:  # the step-0 checkpoint is written before the run exists
            steps = {s for s, name, _ in _stored_rows(store, state["run_id"]) if name == "loss"}
            seen.append((state["step"], steps))
        real_save(path, state)

    monkeypatch.setattr(train_mod, "save_checkpoint", checking_save)
    train(cfg)
    assert [step for step, _ in seen] == [10, 20, 30]
    for step, steps in seen:
        assert steps == set(range(step)), f"checkpoint at {step} claims steps whose rows are not on disk"


def test_resume_forgets_rows_logged_after_its_checkpoint(corpus, tmp_path, monkeypatch):
    """A crash after rows past the checkpoint were committed: the resumed run deletes them and
    logs them again, so each step's rows exist once and equal an uninterrupted run's."""
    store = tmp_path / "store.sqlite"

    def cfg_for(name):
        return small_cfg(corpus, steps=30, eval_every=10, monitor="default", out_dir=str(tmp_path / name), store=str(store),
                         run_name=name, checkpoint_every=10)

    full = train(cfg_for("full"))
    copies = {}
    real_save = train_mod.save_checkpoint

    def keeping_save(path, state):
        real_save(path, state)
        copies[state["step"]] = Path(path).read_bytes()

    monkeypatch.setattr(train_mod, "save_checkpoint", keeping_save)
    cfg = cfg_for("crashed")
    cfg.stop_at = 25
    part = train(cfg)
    assert part.status == "interrupted"
    assert max(s for s, _, _ in _stored_rows(store, part.run_id)) == 24  # rows of steps 20..24 are committed
    (tmp_path / "crashed" / "checkpoint.pt").write_bytes(copies[20])  # as if killed before the step-25 checkpoint
    cfg.stop_at = 0
    resumed = train(cfg, resume=True)
    assert resumed.run_id == part.run_id and resumed.status == "completed"
    got, want = _stored_rows(store, part.run_id), _stored_rows(store, full.run_id)
    assert len({(s, n) for s, n, _ in got}) == len(got)  # no (step, name) twice
    assert got == want  # every row once, bitwise equal to the uninterrupted run
    assert resumed.max_attn_logit == full.max_attn_logit  # over the whole run, not the resumed part only


# --------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------
def test_huge_lr_diverges_cleanly(corpus):
    cfg = small_cfg(corpus, steps=30, log_every=5)
    cfg.optim.lr = 1e6
    cfg.optim.warmup_steps = 2
    r = train(cfg)
    assert r.status == "diverged"
    assert isinstance(r.diverged_at, int) and 0 < r.diverged_at < r.steps_done <= 30
    assert not np.isfinite(r.train_loss[r.diverged_at])
    assert np.isfinite(r.train_loss[: r.diverged_at]).all()
    assert math.isnan(r.final_val_loss)


def test_injected_inf_loss_gives_exact_diverged_at(corpus, monkeypatch):
    class InfAt7(TinyGPT):
        calls = 0

        def forward(self, idx, targets=None):
            logits, loss = super().forward(idx, targets)
            if self.training:
                InfAt7.calls += 1
                if InfAt7.calls == 8:  # step 7
                    loss = loss * float("inf")
            return logits, loss

    monkeypatch.setattr(train_mod, "TinyGPT", InfAt7)
    r = train(small_cfg(corpus, steps=30, log_every=5, monitor="default"))
    assert r.status == "diverged" and r.diverged_at == 7
    assert r.steps_done == 10  # stops at the next log boundary


# --------------------------------------------------------------------------------------
# Independent weight decay (Wortsman et al. 2023; NanoDO: weight_decay = lambda / peak_lr)
# --------------------------------------------------------------------------------------
def decay_factor(peak_lr: float, independent: bool, lam: float = 0.1, step: int = 30) -> tuple[float, list]:
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    ocfg = OptimConfig(lr=peak_lr, weight_decay=lam, independent_wd=independent, warmup_steps=10)
    opt = build_optimizer(model, ocfg)
    lr_t = lr_at(step, peak_lr, 10, 100, "cosine", peak_lr * ocfg.min_lr_ratio)
    for g in opt.param_groups:
        g["lr"] = lr_t * g["lr_scale"]
    w = model.transformer.h[0].attn.c_attn.weight
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0/eps = 0: only the decay moves w
    opt.step()
    ratio = w.detach() / before
    return float(ratio.mean()), opt.param_groups


def test_independent_wd_sets_lambda_over_lr():
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=1e-4, independent_wd=True))
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, pytest.approx(1e-4 / 2e-3)]
    opt = build_optimizer(model, OptimConfig(lr=2e-3, weight_decay=1e-4, independent_wd=False))
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-4]


def test_independent_wd_decay_does_not_depend_on_peak_lr():
    lam, step = 0.1, 30
    frac = lr_at(step, 1.0, 10, 100, "cosine", 0.1)  # lr_t / peak, the same for every peak
    f1, _ = decay_factor(1e-2, True, lam, step)
    f2, _ = decay_factor(1e-3, True, lam, step)
    assert f1 == pytest.approx(1 - frac * lam, rel=1e-6)
    assert f2 == pytest.approx(f1, rel=1e-6)
    # coupled decay (torch default) scales with the peak lr
    c1, _ = decay_factor(1e-2, False, lam, step)
    c2, _ = decay_factor(1e-3, False, lam, step)
    assert c1 == pytest.approx(1 - 1e-2 * frac * lam, rel=1e-6)
    assert c2 == pytest.approx(1 - 1e-3 * frac * lam, rel=1e-6)


# --------------------------------------------------------------------------------------
# z-loss (PaLM; Wortsman et al. 2023 §3.2): 1e-4 * mean(logsumexp^2)
# --------------------------------------------------------------------------------------
def manual_logz(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    m = z.max(-1, keepdim=True).values
    return (m + torch.log(torch.exp(z - m).sum(-1, keepdim=True))).squeeze(-1)


def test_z_loss_formula_and_ignore_mask():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4 - 2
    want = 1e-4 * (manual_logz(logits) ** 2).mean()
    torch.testing.assert_close(z_loss(logits).double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(z_loss(logits, 1e-4).double(), want, rtol=1e-6, atol=0)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :3] = True
    mask[2, 4] = True
    lz2 = manual_logz(logits) ** 2
    want_masked = 1e-4 * lz2[~mask].mean()
    torch.testing.assert_close(z_loss(logits, 1e-4, ignore_mask=mask).double(), want_masked, rtol=1e-6, atol=0)
    assert z_loss(torch.zeros(2, 4)).item() == pytest.approx(1e-4 * math.log(4) ** 2)
    with pytest.raises(ValueError):
        z_loss(logits, -1.0)


def test_train_records_ce_but_steps_on_ce_plus_z(corpus, tmp_path):
    coef = 0.5  # large, so the z term visibly changes Adam's first (sign-like) update
    cfg = small_cfg(corpus, steps=1, z_loss=coef, out_dir=str(tmp_path / "z"), checkpoint_every=1)
    r = train(cfg)
    trained = load_checkpoint(tmp_path / "z" / "checkpoint.pt")["model"]

    def one_step(with_z: bool):
        torch.manual_seed(cfg.seed)
        model = TinyGPT(cfg.model)
        opt = build_optimizer(model, cfg.optim)
        lr0 = lr_at(0, cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps, cfg.optim.decay, cfg.optim.lr * cfg.optim.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr0 * g["lr_scale"]
        ds = load_dataset(cfg.data)
        x, y = ds.batch("train", cfg.seed, 0, cfg.batch_size, cfg.model.block_size)
        logits, ce = model(x, y)
        zterm = coef * (manual_logz(logits.float()).float() ** 2).mean()
        ((ce + zterm) if with_z else ce).backward()
        opt.step()
        return float(ce.detach()), float(zterm.detach()), model.state_dict()

    ce0, z0, with_z = one_step(True)
    _, _, without_z = one_step(False)
    assert r.train_loss[0] == pytest.approx(ce0, rel=1e-6)  # the recorded loss is the CE alone
    assert z0 > 1.0 and abs(r.train_loss[0] - (ce0 + z0)) > 1.0
    # Adam's first update is ~lr0 * sign(g) = 1e-3 per coordinate: a 1e-6 match pins the sign of
    # every gradient coordinate, and leaving the z term out flips many of them.
    diff_z = max(float((trained[n] - w).abs().max()) for n, w in with_z.items())
    diff_ce = max(float((trained[n] - w).abs().max()) for n, w in without_z.items())
    assert diff_z < 1e-6
    assert diff_ce > 1e-4


# --------------------------------------------------------------------------------------
# Sequence-length warm-up (Li et al. 2022; DeepSpeed fixed_linear)
# --------------------------------------------------------------------------------------
def test_seqlen_warmup_deepspeed_worked_example():
    got = [seqlen_warmup(t, 8, 1024, 15000, 8) for t in (0, 1, 100, 7500, 14999, 15000)]
    assert got == [8, 8, 8, 512, 1016, 1024]
    assert seqlen_warmup(10**6, 8, 1024, 15000, 8) == 1024
    # fixed_root with degree 2: floor(sqrt(t/T) * (max - min) + min)
    assert seqlen_warmup(3750, 8, 1024, 15000, 8, root=2) == (int(0.5 * 1016 + 8) // 8) * 8
    with pytest.raises(ValueError):
        seqlen_warmup(-1, 8, 1024, 15000)


def test_train_truncates_batches_during_seqlen_warmup(corpus, monkeypatch):
    lengths = []

    class Recording(TinyGPT):
        def forward(self, idx, targets=None):
            if self.training:
                lengths.append(idx.shape[1])
                assert targets.shape == idx.shape
            return super().forward(idx, targets)

    monkeypatch.setattr(train_mod, "TinyGPT", Recording)
    cfg = small_cfg(corpus, steps=16)
    cfg.seqlen_warmup.enabled = True
    cfg.seqlen_warmup.start = 8
    cfg.seqlen_warmup.steps = 12
    cfg.seqlen_warmup.multiple = 8
    infos = []
    r = train(cfg, on_log=lambda step, info: infos.append(info["seq_len"]))
    assert r.status == "completed"
    # closed form: d = floor(t/12 * (32 - 8) + 8), rounded down to a multiple of 8, at most 32
    want = [min(32, (math.floor(min(1, t / 12) * 24 + 8) // 8) * 8) for t in range(16)]
    assert want[:3] == [8, 8, 8] and want[-1] == 32
    assert lengths == want
    assert infos == [want[9], want[15]]


# --------------------------------------------------------------------------------------
# LR schedules
# --------------------------------------------------------------------------------------
def test_lr_schedules_closed_form():
    peak, lo, W, N = 1e-2, 1e-3, 10, 110
    for fn in (warmup_cosine, warmup_linear, warmup_constant):
        assert fn(0, peak, W, N, lo) == pytest.approx(peak / W)  # step 0 already moves the weights
        assert fn(4, peak, W, N, lo) == pytest.approx(peak * 5 / W)
        assert fn(W - 1, peak, W, N, lo) == pytest.approx(peak)
        assert fn(W, peak, W, N, lo) == pytest.approx(peak)
    mid = W + (N - W) // 2
    assert warmup_cosine(mid, peak, W, N, lo) == pytest.approx((peak + lo) / 2)
    q = W + (N - W) // 4
    assert warmup_cosine(q, peak, W, N, lo) == pytest.approx(lo + 0.5 * (1 + math.cos(math.pi / 4)) * (peak - lo))
    assert warmup_linear(mid, peak, W, N, lo) == pytest.approx((peak + lo) / 2)
    assert warmup_linear(q, peak, W, N, lo) == pytest.approx(peak - 0.25 * (peak - lo))
    for fn in (warmup_cosine, warmup_linear):
        assert fn(N, peak, W, N, lo) == pytest.approx(lo)
        assert fn(N + 50, peak, W, N, lo) == pytest.approx(lo)
    assert warmup_constant(N + 50, peak, W, N, lo) == peak
    assert warmup_cosine(0, peak, 0, N, lo) == pytest.approx(peak)  # no warm-up
    assert lr_at(mid, peak, W, N, "linear", lo) == warmup_linear(mid, peak, W, N, lo)
    # monotone: non-decreasing in warm-up, non-increasing after
    vals = [warmup_cosine(t, peak, W, N, lo) for t in range(N + 1)]
    assert all(a <= b for a, b in zip(vals[:W], vals[1:W]))
    assert all(a >= b for a, b in zip(vals[W:], vals[W + 1 :]))


def test_lr_schedule_errors():
    for fn in (warmup_cosine, warmup_linear, warmup_constant):
        with pytest.raises(ValueError, match="step"):
            fn(-1, 1e-3, 10, 100)
        with pytest.raises(ValueError):
            fn(0, -1e-3, 10, 100)
    with pytest.raises(ValueError, match="decay"):
        lr_at(0, 1e-3, 10, 100, "exponential")


# --------------------------------------------------------------------------------------
# Presets and config validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_train_config(name):
    from seismo.proxy.fullbatch import FullBatchConfig

    cfg = get_preset(name)
    cls = FullBatchConfig if name in ("modular_mlp", "eos_mlp") else TrainConfig
    assert isinstance(cfg, cls)
    cfg.validate()
    cfg.steps += 1
    assert get_preset(name).steps == cfg.steps - 1  # a fresh config every call
    assert cls.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_names_the_field():
    with pytest.raises(ConfigError, match="^preset:"):
        get_preset("nope")


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda c: setattr(c.optim, "lr", -1.0), "optim.lr"),
        (lambda c: setattr(c.optim, "decay", "step"), "optim.decay"),
        (lambda c: setattr(c, "steps", 0), "steps"),
        (lambda c: setattr(c, "seq_len", 1000), "seq_len"),
        (lambda c: setattr(c, "monitor", "everything"), "monitor"),
        (lambda c: setattr(c, "z_loss", -1.0), "z_loss"),
        (lambda c: setattr(c, "batch_size", 0), "batch_size"),
        (lambda c: setattr(c.model, "n_embd", 30), "model.n_embd"),
        (lambda c: setattr(c, "qk_clip", -1.0), "qk_clip"),
        (lambda c: (setattr(c, "qk_clip", 100.0), setattr(c.model, "qk_norm", True)), "qk_clip"),
        (lambda c: (setattr(c, "qk_clip", 100.0), setattr(c.model, "attention", "cosine")), "qk_clip"),
        (lambda c: (setattr(c, "qk_clip", 100.0), setattr(c.model, "sigma_reparam", True)), "qk_clip"),
    ],
)
def test_train_config_errors_name_the_field(mutate, field):
    cfg = TrainConfig()
    mutate(cfg)
    with pytest.raises(ConfigError, match=f"^{field}:"):
        cfg.validate()


# --------------------------------------------------------------------------------------
# QK-Clip (Kimi K2, arXiv 2507.20534, section 2.1) after each optimizer step
# --------------------------------------------------------------------------------------
def reference_head_max_logits(model: TinyGPT, x: torch.Tensor) -> list[list[float]]:
    """Slow reference, in float64 from the weights: per layer and head, max over the batch and the
    causal positions j <= i of (W_q a_i + b_q) . (W_k a_j + b_k) / sqrt(head_dim), where a is the
    attention's input (captured by a hook; the attention's own logits are not used)."""
    inputs: dict[int, torch.Tensor] = {}
    blocks = list(model.transformer.h)
    hooks = [b.attn.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].detach())) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for i, blk in enumerate(blocks):
        w, bias, nh = blk.attn.c_attn.weight.detach().double(), blk.attn.c_attn.bias.detach().double(), blk.attn.n_head
        c = w.shape[1]
        hd = c // nh
        a = inputs[i].double()
        t = a.shape[1]
        future = torch.ones(t, t, dtype=torch.bool).triu(1)
        row = []
        for h in range(nh):
            q = a @ w[h * hd:(h + 1) * hd].T + bias[h * hd:(h + 1) * hd]
            k = a @ w[c + h * hd:c + (h + 1) * hd].T + bias[c + h * hd:c + (h + 1) * hd]
            s = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(future, -math.inf)
            row.append(float(s.amax()))
        out.append(row)
    return out


def _train_keeping_model(cfg: TrainConfig, monkeypatch) -> tuple:
    made = []

    class Kept(TinyGPT):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(train_mod, "TinyGPT", Kept)
    r = train(cfg)
    ds = load_dataset(cfg.data)
    x, _ = ds.batch("train", cfg.seed, cfg.steps - 1, cfg.batch_size, cfg.model.block_size, "cpu")
    return r, reference_head_max_logits(made[-1], x)


@pytest.mark.parametrize("monitor", ["none", "default"])
def test_qk_clip_bounds_every_heads_max_logit_on_the_training_batch(corpus, monkeypatch, monitor):
    """At LR 0.1 the baseline's heads reach logits > 3 tau; with qk_clip = tau every head of the
    final weights has a max logit <= 1.05 tau on the last training batch (all 8 sequences: with
    the monitor on, which reads only 2, QK-Clip must still see the whole batch). Not exactly tau:
    the clip rescales the weights after the optimizer step by the logits before it."""
    tau = 30.0
    cfg = small_cfg(corpus, steps=60, monitor=monitor)
    cfg.optim.lr = 0.1
    base, base_logits = _train_keeping_model(cfg, monkeypatch)
    cfg.qk_clip = tau
    clipped, logits = _train_keeping_model(cfg, monkeypatch)
    assert base.status == clipped.status == "completed"
    assert max(max(row) for row in base_logits) > 3 * tau
    assert all(v <= 1.05 * tau for row in logits for v in row), logits
    assert max(max(row) for row in logits) > 0.8 * tau  # clipped to tau, not far below it
    assert not np.array_equal(base.train_loss, clipped.train_loss)


def test_qk_clip_off_or_never_firing_is_bitwise_neutral(corpus):
    """qk_clip = 0 is the golden run; a tau no logit reaches attaches QK-Clip to the taps (every
    forward then emits logits) and multiplies W_q, W_k by exactly 1.0: the same losses, bitwise."""
    off = train(small_cfg(corpus, monitor="default"))
    never = train(small_cfg(corpus, monitor="default", qk_clip=1e6))
    np.testing.assert_allclose(off.train_loss, GOLDEN, rtol=1e-4)
    assert np.array_equal(off.train_loss, never.train_loss)
    assert off.final_val_loss == never.final_val_loss


def test_qk_clip_reads_the_whole_batch_of_the_step_with_the_monitor_attached(corpus, monkeypatch):
    """The per-head maxima QK-Clip acts on at step 0 are those of all 8 sequences of the step-0
    batch under the initial weights (the reference recomputes them from a model built with the same
    seed), not of the 2 the monitor's attention probe reads."""
    seen = []
    real = train_mod.qk_clipper

    def spy(model, tau):
        clip = real(model, tau)

        def f():
            seen.append({k: v.clone() for k, v in clip.__self__.max_logits.items()})
            return clip()
        return f

    monkeypatch.setattr(train_mod, "qk_clipper", spy)
    cfg = small_cfg(corpus, steps=3, monitor="default", qk_clip=100.0)
    train(cfg)
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.model)
    x, _ = load_dataset(cfg.data).batch("train", cfg.seed, 0, cfg.batch_size, cfg.model.block_size, "cpu")
    full, first2 = reference_head_max_logits(model, x), reference_head_max_logits(model, x[:2])
    got = [seen[0][f"transformer.h.{i}.attn"].tolist() for i in range(cfg.model.n_layer)]
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-6)
    assert not np.allclose(full, first2, rtol=1e-3)  # the test could tell the two apart


def test_a_checkpoint_from_before_qk_clip_existed_still_resumes_unless_qk_clip_is_on():
    """A config saved before the field existed has no ``qk_clip``: it meant 0 (off)."""
    from seismo.proxy.checkpoint import config_differences

    saved = TrainConfig().to_dict()
    del saved["qk_clip"]
    assert config_differences(saved, TrainConfig().to_dict()) == []
    assert config_differences(saved, TrainConfig(qk_clip=100.0).to_dict()) == [("qk_clip", 0.0, 100.0)]
