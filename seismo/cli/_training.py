"""Starting a proxy run from the command line (shared by ``seismo train`` and ``seismo demo``).

:func:`preflight` checks everything that can be checked before a run starts (device, memory,
output directory, checkpoint), so bad input is one line and exit status 2, never a traceback
minutes later; :func:`train_with_progress` runs :func:`seismo.proxy.train` under a live progress
line.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from seismo.cli._common import CLIError, check_directory, esc, fmt
from seismo.diagnose.engine import AlertPrinter
from seismo.errors import ConfigError
from seismo.proxy.checkpoint import RESUMABLE_CHANGES, check_resume_checkpoint
from seismo.proxy.fullbatch import FullBatchConfig
from seismo.proxy.resources import check_device, check_memory
from seismo.proxy.sweep import Trial
from seismo.proxy.train import RunResult, TrainConfig, train

__all__ = ["preflight", "preflight_trials", "check_resume", "train_with_progress"]


def preflight(cfg, out: str | Path) -> None:
    """Validate ``cfg`` and refuse, with one line naming the field, a run that cannot start here:
    an unknown or absent device, a size that cannot fit in memory, an ``--out`` that is a file."""
    cfg.validate()
    check_directory(out, "--out")
    check_device(getattr(cfg, "device", "cpu"))
    check_memory(cfg)


def preflight_trials(trials: list[Trial]) -> None:
    """:func:`preflight`'s device and memory checks for every trial of a sweep (before any runs);
    the error names the first trial that cannot run here."""
    for t in trials:
        cfg = FullBatchConfig.from_dict(t.config) if t.config.get("kind") == "fullbatch" else TrainConfig.from_dict(t.config)
        try:
            check_device(getattr(cfg, "device", "cpu"))
            check_memory(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (trial {t.run_name})") from None


def check_resume(cfg: TrainConfig, run_dir: Path, resume_or_start: bool) -> bool:
    """Whether to resume ``run_dir``: its checkpoint must be a readable checkpoint of this config
    (else one line naming the problem). Without a checkpoint, ``--resume`` is an error and
    ``--resume-or-start`` starts fresh (returns False)."""
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.exists():
        if resume_or_start:
            return False
        raise CLIError(f"--resume: no checkpoint at {ckpt}; run without --resume to start fresh (or use --resume-or-start)")
    # The data decides the vocabulary when the run starts; train() compares it against the model.
    check_resume_checkpoint(ckpt, cfg.to_dict(), ignore=RESUMABLE_CHANGES | {"model.vocab_size"})
    return True


def train_with_progress(cfg: TrainConfig, console: Console, label: str, resume: bool = False) -> RunResult:
    """Run :func:`seismo.proxy.train` with a live rich progress line and live alerts."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as progress:
        task = progress.add_task(esc(label), total=cfg.steps, stats="")
        alerts = AlertPrinter(progress.console, quiet_steps=cfg.steps)
        warned = False

        def on_log(step: int, info: dict) -> None:
            nonlocal warned
            logit = info.get("attn_logit_max", math.nan)
            stats = f"loss {fmt(info['loss'])}  max attn logit {fmt(logit, 1)}  lr {info['lr']:.2e}"
            progress.update(task, completed=step + 1, stats=stats)
            if not math.isfinite(info["loss"]) and not warned:
                warned = True
                progress.console.print(f"  [red]step {step + 1}: loss is not finite; the run diverged[/red]")

        result = train(cfg, on_log=on_log, resume=resume, on_event=alerts)
        progress.update(task, completed=result.steps_done)
    return result
