"""One-line errors, exit status 2, for every bad input that can be checked before or at startup
(issue 16, item 4); run-time failures are one line with exit status 1; ``--debug`` and
``SEISMO_DEBUG=1`` show the traceback.

Each case runs the real CLI in-process (``seismo.cli.main``) and asserts a single stderr line
that names the field, and that nothing was started (no run store, no run directory).
"""

from __future__ import annotations

import io
import re
import zipfile

import pytest
import torch

from seismo.cli import main
from seismo.errors import ConfigError
from seismo.proxy.checkpoint import check_resume_checkpoint, config_differences, load_resume_checkpoint
from seismo.proxy.config import INT_MAX, apply_overrides
from seismo.proxy.model import TinyGPT
from seismo.proxy.presets import get_preset, tiny
from seismo.proxy.resources import check_device, check_memory, memory_estimate
from seismo.proxy.sweep import load_sweep_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["train", "--preset", "tiny", "--set", "steps=4", "--set", "eval_every=0", "--set", "monitor=minimal"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("SEISMO_DEBUG", raising=False)


def _field_in(field: str, line: str) -> bool:
    return re.search(rf"(^|[\s:(]){re.escape(field)}(\W|$)", line) is not None


# --- values that cannot be right -------------------------------------------------------------

@pytest.mark.parametrize("override, field", [
    ("steps=1e30", "steps"),  # was turned into a 31-digit integer, then a torch error
    ("steps=1e15", "steps"),  # fits in 64 bits, but its loss buffer alone is 4 PB
    ("optim.eps=nan", "optim.eps"),  # nan < 0 is False: was accepted
    ("z_loss=nan", "z_loss"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=-inf", "optim.weight_decay"),
    ("device=xyz", "device"),
    ("device=meta", "device"),
    ("batch_size=100000000", "batch_size"),  # 1e8 x 64 tokens of activations
    ("model.n_embd=1048576", "model.n_embd"),  # 13e12 parameters
    (f"seed={INT_MAX + 1}", "seed"),
])
def test_bad_values_are_one_line_before_anything_starts(override, field, tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    assert main([*TINY, "--set", override, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert _field_in(field, line), line
    assert not out.exists()  # nothing was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys, one_error_line):
    assert main([*TINY, "--set", "device=cuda", "--out", str(tmp_path / "runs")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("seismo: error: device: 'cuda' but CUDA is not available")


def test_parse_refuses_non_finite_and_out_of_range_by_hand():
    cfg = tiny()
    for text in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(ConfigError, match="optim.lr: expected a finite number"):
            apply_overrides(cfg, [f"optim.lr={text}"])
    with pytest.raises(ConfigError, match="steps: '1e30' is out of range"):
        apply_overrides(cfg, ["steps=1e30"])
    apply_overrides(cfg, ["steps=1e3"])  # an integral float in range is the integer
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    with pytest.raises(ConfigError, match=r"spikes.steps\[1\]: expected an integer, got 1.5"):
        apply_overrides(cfg, ["spikes.steps=[1, 1.5]"])
    with pytest.raises(ConfigError, match="hidden\\[0\\]: expected an integer"):
        apply_overrides(get_preset("eos_mlp"), ["hidden=[64.5]"])


def test_memory_estimate_counts_parameters_like_the_model():
    """The lower bound's parameter part is the real parameter count times (weights, grads, Adam m, v)."""
    cfg = tiny()
    est = memory_estimate(cfg)
    model = TinyGPT(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    assert est.n_params == n
    assert est.params == n * 4 * 4
    assert est.buffers == cfg.steps * 4
    # activations: at least B x T x (layers x ((5 + mlp_ratio) d + heads T) + 2 V) floats
    m = cfg.model
    assert est.activations == cfg.batch_size * m.block_size * (m.n_layer * ((5 + m.mlp_ratio) * m.n_embd + m.n_head * m.block_size)
                                                               + 2 * m.vocab_size) * 4
    check_memory(cfg)  # fits
    with pytest.raises(ConfigError, match="needs at least"):
        check_memory(cfg, available=est.total - 1)


def test_device_names():
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("xyz", "cuda:x", "", "meta"):
        with pytest.raises(ConfigError, match="^device: "):
            check_device(bad)


# --- --out that is a file --------------------------------------------------------------------

@pytest.mark.parametrize("command", [TINY, ["demo", "--steps", "2"]])
@pytest.mark.parametrize("below", [False, True])
def test_out_naming_a_file_is_one_line(command, below, tmp_path, capsys, one_error_line):
    f = tmp_path / "afile"
    f.write_text("not a directory")
    out = f / "sub" if below else f
    assert main([*command, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"seismo: error: --out: {f} is a file, not a directory"
    assert f.read_text() == "not a directory"


# --- sweep files -----------------------------------------------------------------------------

def test_toml_seeds_must_be_integers(tmp_path, capsys, one_error_line):
    toml = tmp_path / "s.toml"
    toml.write_text('name = "s"\nlrs = [1e-2]\nseeds = [1.5]\n')
    with pytest.raises(ConfigError, match="sweep.seeds: must be integers >= 0, got 1.5"):
        load_sweep_file(toml)
    assert main(["sweep", str(toml), "--out", str(tmp_path / "runs")]) == 2
    assert "sweep.seeds" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, field", [
    ("batch_size=100000000", "batch_size"),
    ("device=xyz", "device"),
    ("optim.eps=nan", "optim.eps"),
])
def test_sweep_trials_that_cannot_run_here_are_refused_before_any_runs(override, field, tmp_path, capsys, one_error_line):
    out = tmp_path / "runs"
    assert main(["sweep", "qk_layernorm", "--quick", "--set", override, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert _field_in(field, line), line
    assert not out.exists()


# --- --resume on a bad checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run stopped after 2 of 4 steps: its directory holds a real checkpoint.pt and config.json."""
    out = tmp_path_factory.mktemp("resume") / "runs"
    assert main([*TINY, "--set", "stop_at=2", "--out", str(out), "--name", "r"]) == 0
    ckpt = out / "r" / "checkpoint.pt"
    assert ckpt.is_file()
    return out, ckpt.read_bytes()


def _damaged(tmp_path, stopped_run, damage) -> tuple[list[str], object]:
    import shutil

    src, good = stopped_run
    out = tmp_path / "runs"
    shutil.copytree(src, out)
    ckpt = out / "r" / "checkpoint.pt"
    damage(ckpt, good)
    return [*TINY, "--out", str(out), "--name", "r", "--resume"], ckpt


def _foreign_pickle(path, good):
    class Evil:  # a pickle that would run code: weights_only refuses it, nothing executes
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, path)


def _other_shapes(path, good):
    ck = torch.load(io.BytesIO(good), weights_only=True)
    key = next(k for k in ck["model"] if k.endswith("c_attn.weight"))
    ck["model"][key] = torch.zeros(3, 3)
    torch.save(ck, path)


@pytest.mark.parametrize("damage, message", [
    (lambda p, g: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p, g: p.write_bytes(g[: len(g) // 2]), "is corrupt or truncated"),
    (lambda p, g: p.write_bytes(bytes(b ^ 0x5A for b in g)), "is corrupt or truncated"),
    (lambda p, g: torch.save(torch.zeros(3), p), "not a seismo checkpoint (it holds a Tensor"),
    (lambda p, g: torch.save({"step": 1}, p), "not a seismo checkpoint (missing model, optim, rng, losses, val)"),
    (_foreign_pickle, "not a seismo checkpoint (refused by torch.load(weights_only=True)"),
])
def test_resume_on_a_bad_checkpoint_is_one_line_naming_the_problem(damage, message, tmp_path, stopped_run, capsys, one_error_line):
    argv, ckpt = _damaged(tmp_path, stopped_run, damage)
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert message in line and str(ckpt) in line, line
    assert "pwned" not in captured.out


def test_resume_with_another_config_names_the_fields(tmp_path, stopped_run, capsys, one_error_line):
    argv, _ = _damaged(tmp_path, stopped_run, lambda p, g: None)
    assert main([*argv, "--set", "optim.lr=0.02", "--set", "model.n_embd=32"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "different config" in line
    assert "model.n_embd 64 -> 32" in line and "optim.lr 0.01 -> 0.02" in line


def test_resume_with_other_shapes_names_the_parameter(tmp_path, stopped_run):
    """The model check (what train() runs when it restores a checkpoint)."""
    _, ckpt = _damaged(tmp_path, stopped_run, _other_shapes)
    cfg = apply_overrides(tiny(), ["steps=4", "eval_every=0", "monitor=minimal"])  # the stopped run's config
    model = TinyGPT(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    key = next(k for k in model.state_dict() if k.endswith("c_attn.weight"))
    expected = f"does not fit the model: {key} has shape (3, 3) in the checkpoint, (192, 64) in the model"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_resume_checkpoint(ckpt, cfg.to_dict(), model, opt)


def test_resume_with_other_shapes_through_the_cli(tmp_path, stopped_run, capsys, one_error_line):
    argv, _ = _damaged(tmp_path, stopped_run, _other_shapes)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not fit the model" in line and "c_attn.weight" in line


def test_a_good_checkpoint_passes_and_config_differences_by_hand(tmp_path, stopped_run):
    _, ckpt = _damaged(tmp_path, stopped_run, lambda p, g: None)
    ck = check_resume_checkpoint(ckpt)
    assert ck["step"] == 2
    assert config_differences({"a": 1, "b": {"c": [1, 2]}, "stop_at": 2}, {"a": 1, "b": {"c": (1, 2)}, "stop_at": 0}) == []
    assert config_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == [("b.c", 2, 3), ("d", "<missing>", 4)]


# --- run-time failures and --debug ------------------------------------------------------------

def _fail(*args, **kwargs):
    raise RuntimeError("the kernel exploded\nsecond line of detail")


def test_runtime_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch, one_error_line):
    monkeypatch.setattr("seismo.cli._training.train", _fail)
    assert main([*TINY, "--out", str(tmp_path / "runs")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("seismo: error: RuntimeError: the kernel exploded") and "--debug" in line


@pytest.mark.parametrize("how", ["flag", "subflag", "env"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    monkeypatch.setattr("seismo.cli._training.train", _fail)
    argv = [*TINY, "--out", str(tmp_path / "runs")]
    if how == "flag":
        argv = ["--debug", *argv]
    elif how == "subflag":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("SEISMO_DEBUG", "1")
    with pytest.raises(RuntimeError, match="the kernel exploded"):
        main(argv)
    with pytest.raises(ConfigError, match="optim.eps"):  # input errors too
        main([*argv, "--set", "optim.eps=nan"])


def test_zip_errors_are_corrupt_not_crashes(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        check_resume_checkpoint(bad)
