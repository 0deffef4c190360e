"""``seismo train``: train a proxy model from a preset into ``--out`` and its run store."""

from __future__ import annotations

import argparse
from pathlib import Path

from seismo.cli._common import DEFAULT_RUNS_DIR, CLIError, Subcommand, console, ensure_directory, esc, fmt
from seismo.cli._training import check_resume, preflight, train_with_progress
from seismo.proxy.config import apply_overrides
from seismo.proxy.fullbatch import train_fullbatch
from seismo.proxy.measures import trial_measures
from seismo.proxy.presets import get_preset
from seismo.proxy.run_dirs import RunDirLock, run_dir_name

__all__ = ["Train"]


class Train(Subcommand):
    name = "train"
    help = "train a proxy model from a preset"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", default="baseline", help="preset name (see `seismo presets`)")
        parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. optim.lr=3e-3 (repeatable)")
        parser.add_argument("--name", default=None,
                            help="run name, stored verbatim; its directory under --out is a safe slug of it (default: the preset's)")
        parser.add_argument("--out", default=DEFAULT_RUNS_DIR, help="directory for runs and the run store (default: runs)")
        resume = parser.add_mutually_exclusive_group()
        resume.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint (error if there is none)")
        resume.add_argument("--resume-or-start", action="store_true", help="continue from the checkpoint if there is one, else start fresh")
        parser.add_argument("--fail-on-divergence", action="store_true", help="exit with status 1 if the run diverges")

    def run(self, args: argparse.Namespace) -> int:
        cfg = get_preset(args.preset)
        apply_overrides(cfg, args.set or [])
        if args.name is not None:
            cfg.run_name = args.name
        dir_name = run_dir_name(cfg.run_name, "--name")
        out = Path(args.out)
        if not cfg.out_dir and getattr(cfg, "kind", "") != "fullbatch":
            cfg.out_dir = str(out / dir_name)  # before preflight: checkpoint_every needs an out_dir to validate
        preflight(cfg, out)
        if not cfg.store:
            cfg.store = str(out / "seismo.sqlite")
        if getattr(cfg, "kind", "") == "fullbatch":  # a full-batch MLP preset (modular_mlp, eos_mlp)
            return self._run_fullbatch(cfg, args, out)
        run_dir = Path(cfg.out_dir)
        resume = (args.resume or args.resume_or_start) and check_resume(cfg, run_dir, args.resume_or_start)
        ensure_directory(out, "--out")
        con = console()
        with RunDirLock(run_dir, cfg.run_name):  # two processes never write one run directory
            r = train_with_progress(cfg, con, cfg.run_name, resume=resume)
        con.print(
            f"{esc(cfg.run_name)}: {r.status} after {r.steps_done} steps; final train loss {fmt(r.final_train_loss)}, "
            f"val loss {fmt(r.final_val_loss)}, max attention logit {fmt(r.max_attn_logit, 1)}\n"
            f"run dir {esc(r.run_dir)}; run store {esc(r.store)} (run id {r.run_id})"
        )
        return 0 if r.status != "diverged" or not args.fail_on_divergence else 1

    @staticmethod
    def _run_fullbatch(cfg, args: argparse.Namespace, out: Path) -> int:
        if args.resume or args.resume_or_start:
            raise CLIError(f"--resume: full-batch presets ({args.preset}) run in one go; they have no checkpoints")
        ensure_directory(out, "--out")
        con = console()
        with con.status(f"{esc(cfg.run_name)}: {cfg.steps} full-batch steps"):
            r = train_fullbatch(cfg)
        extra = "".join(f", {k} {fmt(v) if isinstance(v, float) else v}" for k, v in trial_measures(r.history).items())
        con.print(f"{esc(cfg.run_name)}: {r.status} after {r.steps_done} steps; final train loss {fmt(r.final_train_loss)}, "
                  f"val loss {fmt(r.final_val_loss)}{extra}\nrun store {esc(r.store)} (run id {r.run_id})")
        return 0 if r.status != "diverged" or not args.fail_on_divergence else 1
