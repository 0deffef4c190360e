"""What QK-Clip bounds in the ``qk_clip`` sweep preset: the signed max logit, not the max |logit|.

    python bench/qk_clip_signed_max.py [--size m] [--lrs 0.01 0.03 0.1 0.3] [--seeds 0 1 2]

Re-runs the preset's ``qk_clip`` trials (QK-Clip tau = 100, Kimi K2, arXiv 2507.20534 §2.1) with
the trial's exact config (the monitor off: it does not change training, which the final loss,
compared with the stored trial's in docs/REPRODUCTIONS.md, shows) and records, for every step's
training forward over the whole batch, before that step's clip: the largest signed logit (the S
QK-Clip acts on) and the largest |logit| (what the monitor's ``attn/logit_max`` records). Writes
docs/reproductions/qk_clip/signed_max.json, which bench/check_reproductions.py renders.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from seismo.monitor.attention import find_attention_sites
from seismo.proxy.sweep import expand
from seismo.proxy.sweep_presets import get_sweep_preset

train_mod = importlib.import_module("seismo.proxy.train")  # the module (the package re-exports the function)
OUT = Path(__file__).resolve().parents[1] / "docs" / "reproductions" / "qk_clip" / "signed_max.json"


def run(config: dict, tau: float) -> dict:
    cfg = train_mod.TrainConfig.from_dict(config)
    cfg.monitor = "none"
    rec: list[tuple[float, float]] = []
    real = train_mod.qk_clipper

    def recording_clipper(model, tau_):
        clip = real(model, tau_)
        qk = clip.__self__  # the QKClip: its per-head maxima of this step's forward, read before clip() clears them
        absmax: dict[str, torch.Tensor] = {}
        for site in find_attention_sites(model):  # a second callback on the same taps: the same logits, whole batch
            site.install(lambda z, n=site.name: absmax.__setitem__(n, z.detach().float().abs().nan_to_num(nan=0.0, posinf=0.0).amax()),
                         1 << 20)

        def f():
            rec.append((max(float(v.max()) for v in qk.max_logits.values()), max(float(v) for v in absmax.values())))
            return clip()
        return f

    train_mod.qk_clipper = recording_clipper
    try:
        t0 = time.process_time()
        r = train_mod.train(cfg)
        cpu = time.process_time() - t0
    finally:
        train_mod.qk_clipper = real
    a = np.array(rec)
    last = a[-100:]
    return dict(final_val_loss=r.final_val_loss, steps=len(a), cpu_s=round(cpu, 1),
                max_signed=float(a[:, 0].max()), max_abs=float(a[:, 1].max()),
                max_signed_last100=float(last[:, 0].max()), max_abs_last100=float(last[:, 1].max()),
                steps_signed_over_2tau=int((a[:, 0] > 2 * tau).sum()), steps_abs_over_2tau=int((a[:, 1] > 2 * tau).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="m")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    trials = {(t.lr, t.seed): t for t in expand(get_sweep_preset("qk_clip")) if (t.intervention, t.size) == ("qk_clip", args.size)}
    tau = trials[next(iter(trials))].config["qk_clip"]
    rows = json.loads(OUT.read_text())["trials"] if OUT.exists() else []
    for lr in args.lrs:
        for seed in args.seeds:
            t = trials[(lr, seed)]
            row = dict(size=args.size, lr=lr, seed=seed, tau=tau, **run(t.config, tau))
            rows = [x for x in rows if (x["size"], x["lr"], x["seed"]) != (args.size, lr, seed)] + [row]
            OUT.write_text(json.dumps(dict(command="python bench/qk_clip_signed_max.py", torch_threads=1, trials=rows), indent=1) + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
