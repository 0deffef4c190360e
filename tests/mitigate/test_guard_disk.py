"""The Guard and a disk that fails: unwritable ckpt_dir, no ckpt_dir, a disk that fills up during
training, snapshots that cannot be read back on resume.

The rule: a bad directory is a one-line ConfigError at construction; a write failure during
training never raises out of ``guard.step()`` (the Guard goes on in memory, says so once, and its
rollbacks give bitwise the same run); unreadable snapshots stop ``resume()`` unless the user asks
to start fresh. Tests run as root, which ignores permission bits: an unwritable directory is a
path below a regular file, and a full disk is ``seismo._io.atomic_write`` raising ENOSPC.
"""

from __future__ import annotations

import errno
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import seismo._io
from seismo.errors import ConfigError
from seismo.mitigate.guard import TRACKER_NAME, Guard, GuardResumeError, GuardWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KW = dict(interval=10, disk_interval=10, rewind=10, skip_ahead=25)


def make_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(guard: Guard, model: nn.Module, n: int = 80, bad=range(40, 60)) -> None:
    """A regression loop whose loss is x1000 on the data indices ``bad``: 5 skips, then a rollback."""
    for i in guard.steps(n):
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(16, 8, generator=g)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True).sin()) * (1000.0 if i in bad else 1.0)
        loss.backward()
        guard.step(loss)


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The reference: the same run with a working disk."""
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=tmp_path_factory.mktemp("healthy"), **KW)
    train(guard, model)
    guard.close()
    assert guard.stats["rollbacks"] == 1 and guard.skipped_ranges == [(30, 70)]
    return params(model), guard.stats


def guard_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, GuardWarning)]


# --- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["rollback", "skip"])
def test_an_unwritable_ckpt_dir_is_a_one_line_error_at_construction(tmp_path, policy):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    model, opt = make_mlp()
    with pytest.raises(ConfigError, match=r"^ckpt_dir: cannot write snapshots to .*a_file/sub") as info:
        Guard(model, opt, ckpt_dir=blocker / "sub", policy=policy)
    assert "\n" not in str(info.value) and "ckpt_dir=None" in str(info.value)


def test_a_directory_that_refuses_files_is_refused(tmp_path, monkeypatch):
    """mkdir works but no file can be created in it (a read-only mount, a quota)."""
    def refuse(path, write):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(seismo._io, "atomic_write", refuse)
    model, opt = make_mlp()
    with pytest.raises(ConfigError, match=r"ckpt_dir: cannot write snapshots to .*ro \(Permission denied\)"):
        Guard(model, opt, ckpt_dir=tmp_path / "ro")


def test_no_ckpt_dir_is_a_working_in_memory_mode_said_once(healthy):
    model, opt = make_mlp()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guard = Guard(model, opt, ckpt_dir=None, **KW)
        train(guard, model)
        guard.close()
    (msg,) = guard_warnings(record)
    assert "ckpt_dir=None" in msg and "in memory only" in msg
    assert guard.in_memory_only and guard.tracker_path is None
    assert guard.stats["rollbacks"] == 1 and guard.skipped_ranges == [(30, 70)]
    assert all(torch.equal(a, b) for a, b in zip(params(model), healthy[0]))
    with pytest.raises(ConfigError, match="ckpt_dir: Guard.resume"):
        guard.resume()


# --- a disk that fills up during training --------------------------------------------------
@pytest.mark.parametrize("what_fails", ["every write after step 10", "the tracker only"])
def test_a_full_disk_during_training_falls_back_to_memory_with_one_warning(tmp_path, monkeypatch, healthy, what_fails):
    real = seismo._io.atomic_write
    calls = []

    def full_disk(path, write):
        calls.append(os.path.basename(path))
        snapshots_done = sum(n.endswith(".pt") for n in calls[:-1])
        if (what_fails == "the tracker only" and calls[-1] == TRACKER_NAME) or (
                what_fails != "the tracker only" and snapshots_done >= 2):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    model, opt = make_mlp()
    d = tmp_path / "guard"
    guard = Guard(model, opt, ckpt_dir=d, **KW)
    monkeypatch.setattr(seismo._io, "atomic_write", full_disk)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train(guard, model)  # never raises
        guard.close()
    (msg,) = guard_warnings(record)
    assert "No space left on device" in msg and "in-memory checkpoints only" in msg
    assert guard.in_memory_only
    # the rollback still happened, from the in-memory ring, and gave the same run bitwise
    assert guard.stats["rollbacks"] == 1 and guard.skipped_ranges == [(30, 70)]
    assert all(torch.equal(a, b) for a, b in zip(params(model), healthy[0]))
    # nothing was written after the failure (the disk holds the state from before it)
    assert TRACKER_NAME not in os.listdir(d)
    assert not any(n.endswith(".tmp") for n in os.listdir(d))
    if what_fails != "the tracker only":
        assert sorted(n for n in os.listdir(d) if n.endswith(".pt")) == ["guard-step000000000-e0.pt",
                                                                          "guard-step000000010-e0.pt"]


# --- resume with unreadable files ----------------------------------------------------------
def crashed_job(d) -> None:
    """A job that wrote snapshots at steps 0, 10, 20 (disk_keep=2 keeps 10 and 20) and died."""
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=d, disk_keep=2, **KW)
    train(guard, model, n=25, bad=())
    guard._writer.drain()


def test_resume_refuses_when_no_snapshot_can_be_read_and_changes_nothing(tmp_path):
    d = tmp_path / "guard"
    crashed_job(d)
    names = sorted(n for n in os.listdir(d) if n.endswith(".pt"))
    assert names == ["guard-step000000010-e0.pt", "guard-step000000020-e0.pt"]
    for n in names:
        (d / n).write_bytes(b"\x00garbage")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=d, **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GuardWarning)
        with pytest.raises(GuardResumeError, match=r"none of the 2 snapshot\(s\) in .* can be loaded .*"
                                                   r"fresh_if_unreadable=True"):
            guard.resume()
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    # and training cannot start over on top of them by accident
    with pytest.raises(FileExistsError, match="resume"):
        train(guard, model, n=1, bad=())


def test_resume_fresh_if_unreadable_moves_them_aside_and_starts_at_zero(tmp_path):
    d = tmp_path / "guard"
    crashed_job(d)
    for n in os.listdir(d):
        if n.endswith(".pt"):
            (d / n).write_bytes(b"\x00garbage")
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=d, **KW)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert guard.resume(fresh_if_unreadable=True) == 0
    assert any("renamed to *.unreadable" in m for m in guard_warnings(record))
    aside = sorted(n for n in os.listdir(d) if n.endswith(".unreadable"))
    assert aside == ["guard-step000000010-e0.pt.unreadable", "guard-step000000020-e0.pt.unreadable"]
    train(guard, model, n=25, bad=())
    guard.close()
    assert guard.stats["disk_snapshots"] == 3
    assert all((d / n).read_bytes() == b"\x00garbage" for n in aside)  # never overwritten


def test_resume_falls_back_to_an_older_snapshot_when_the_newest_is_damaged(tmp_path):
    d = tmp_path / "guard"
    crashed_job(d)
    (d / "guard-step000000020-e0.pt").write_bytes(b"truncated")
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=d, **KW)
    with pytest.warns(GuardWarning, match="cannot load .*guard-step000000020-e0.pt"):
        assert guard.resume() == 10


def test_an_unreadable_tracker_stops_resume(tmp_path):
    d = tmp_path / "guard"
    crashed_job(d)
    (d / TRACKER_NAME).write_text("{not json")
    model, opt = make_mlp()
    guard = Guard(model, opt, ckpt_dir=d, **KW)
    with pytest.raises(GuardResumeError, match=rf"cannot read the Guard tracker .*{TRACKER_NAME}.*fresh_if_unreadable"):
        guard.resume()
    assert (d / TRACKER_NAME).read_text() == "{not json"
