"""Learning curve of the recall gate: does a CPU-sized Mamba learn the short-distance bindings?

    python prepare_data.py --source=recall-gate --gate=cpu --seq_len=256 --out_dir=data/gate-cpu
    python bench/gate_learnability.py --data_dir=data/gate-cpu --preset=tiny --max_tokens=600000

Trains the baseline with the shared loop (mamba_lm/trainer.py) and, at every eval, scores the gate's
held-out probes (mamba_lm/recall_gate.py: accuracy among the candidates and answer log-prob per
target distance, state carried; the first `probe_tokens` tokens of each probe book). Writes
`out_dir/gate_curve.json`, `gate_curve.md` and `gate_curve.png` (accuracy vs training tokens per
distance, with the chance line), and copies them to `results_dir` when it is set.
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import user_errors

# ----------------------------------------------------------------------------------------------
data_dir = "data/gate-cpu"     # prepare_data.py --source=recall-gate
out_dir = "out/gate-learnability"  # checkpoints, logs, the curve
results_dir = ""               # also copy gate_curve.{json,md,png} here (e.g. bench/results/gate-cpu)
preset = "tiny"                # mamba_lm.mamba.PRESETS
seq_len = 256                  # training window (tokens) [>=1]
batch_size = 16                # sequences per step [>=1]
lr = 3e-3                      # peak learning rate (small models on a synthetic task take a high one) [>0]
loss_on = "answers"            # answers: the loss scores only the answer tokens (MQAR's objective) | all: every token
stateful = False               # each row streams whole books, its state carried across windows (truncated BPTT)
max_tokens = 600_000           # training tokens [>=1]
eval_interval = 25             # steps between gate readings [>=1]
probe_tokens = 3000            # tokens of each probe book scored at each reading (0: all) [>=0]
seed = 1337                    # init and data order [>=0]
device = "cpu"                 # cpu | cuda (the curve in tokens is what the dial is tuned on)
threads = 0                    # torch CPU threads (0: all cores) [>=0]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def main():
    import torch

    from mamba_lm.data import load_meta
    from mamba_lm.mamba import mamba_config
    from mamba_lm.models import build_model
    from mamba_lm.recall_gate import load_probe_set, score_gate
    from mamba_lm.report import pyplot, save_figure
    from mamba_lm.trainer import train

    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    meta = load_meta(data_dir)
    probes = load_probe_set(data_dir)
    vocab, eos = meta["tokenizer"]["vocab_size"], meta["tokenizer"]["eos_id"]
    curve = []

    def on_eval(model, step, out):
        g = score_gate(model, probes, seq_len, vocab, eos, device=next(model.parameters()).device,
                       max_doc_tokens=probe_tokens)
        curve.append({"step": step, "tokens": step * batch_size * seq_len, **g})
        return {f"gate/acc/{t}": b["accuracy"] for t, b in g["buckets"].items()}

    from mamba_lm.plan import script_flags
    from mamba_lm.trainer import TRAIN_KEYS

    defaults = {k: v for k, v in script_flags("train_baseline.py").items() if k in TRAIN_KEYS}
    cfg = {**defaults, "data_dir": data_dir, "out_dir": out_dir, "seq_len": seq_len, "batch_size": batch_size, "lr": lr,
           "min_lr": lr / 10, "loss_on": loss_on, "stateful": stateful, "max_tokens": max_tokens, "eval_interval": eval_interval, "eval_batches": 4,
           "log_interval": 10, "seed": seed, "overwrite": True, "tensorboard": False, "epochs": 100,
           "warmup_frac": 0.05, "device": device}
    train(cfg, lambda: build_model("mamba", mamba_config(preset, vocab_size=vocab)),
                  script="bench/gate_learnability.py", on_eval=on_eval)
    write_curve(curve, pyplot, save_figure)


def write_curve(curve, pyplot, save_figure):
    """gate_curve.json / .md / .png in out_dir (and results_dir)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gate_curve.json"), "w") as f:
        json.dump({"config": config, "curve": curve}, f, indent=1)
    targets = list(curve[-1]["buckets"]) if curve else []
    lines = [f"# Recall-gate learning curve: `{preset}` on `{data_dir}`", "",
             f"Command: `python bench/gate_learnability.py " + " ".join(sys.argv[1:]) + "`  ",
             f"Accuracy = the answer ranked first among the candidates (chance "
             f"{curve[-1]['chance']:.3f}); state carried; reset = state zeroed every {seq_len} tokens.", "",
             "| tokens | step | " + " | ".join(f"acc @{t}" for t in targets) + " | reset acc @" + targets[0]
             + " | logprob @" + targets[0] + " |",
             "| ---: | ---: | " + " | ".join("---:" for _ in targets) + " | ---: | ---: |"] if curve else []
    for row in curve:
        b = row["buckets"]
        lines.append(f"| {row['tokens']:,} | {row['step']} | " + " | ".join(f"{b[t]['accuracy']:.3f}" for t in targets)
                     + f" | {b[targets[0]]['reset_accuracy']:.3f} | {b[targets[0]]['logprob']:.3f} |")
    if curve:
        lines += ["", "Measured token distances per target (min / median / max): "
                  + ", ".join(f"{t}: {curve[-1]['buckets'][t]['distance']}" for t in targets), "",
                  "![gate curve](gate_curve.png)"]
    with open(os.path.join(out_dir, "gate_curve.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if curve:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in targets:
            ax.plot([r["tokens"] for r in curve], [r["buckets"][t]["accuracy"] for r in curve], marker="o",
                    label=f"distance {t}")
        ax.axhline(curve[-1]["chance"], color="grey", ls="--", label="chance")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("gate accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"recall gate: {preset}")
        ax.legend()
        save_figure(fig, os.path.join(out_dir, "gate_curve.png"))
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        for name in ("gate_curve.json", "gate_curve.md", "gate_curve.png"):
            if os.path.exists(os.path.join(out_dir, name)):
                shutil.copy(os.path.join(out_dir, name), os.path.join(results_dir, name))


if __name__ == "__main__":
    with user_errors():
        main()
