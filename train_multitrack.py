"""Train the multi-track Mamba (triple-track SSM + narrative router + cross-track attention).

    python prepare_data.py --source=demo                        # offline demo corpus -> data/demo
    python train_multitrack.py --preset=small-cpu --data_dir=data/demo --out_dir=out/demo-mt --max_steps=300
    python train_multitrack.py --preset=small-cpu --data_dir=data/demo --out_dir=out/demo-mt --max_steps=300 \
        --resume=True                                           # continue: the same flags plus --resume=True
    python train_multitrack.py --router=uniform --out_dir=out/abl-uniform   # ablations: see research_plan.md
    python train_multitrack.py --plot_clock=signals --char_memory=True --out_dir=out/revised  # the revised design

Same loop, hyperparameters, checkpoints, resume, evaluation, logs and plots as train_baseline.py
(mamba_lm/trainer.py); the shared constants below have the same names, defaults and comments (a test
keeps them equal), so a run of each script with the same --data_dir/--seed sees the same data in the same
order with the same budget.
This script only builds the model (parameter-matched to the baseline preset of the same size, see
multitrack/multitrack_config.py) and adds the router hooks:

    on_eval  mean router weight per track (all tokens, dialogue, narration, paragraph starts) and,
             with a plot clock, its open rate (all tokens, at and off boundaries) over the training
             steps since the previous eval -> metrics.jsonl / log.txt / TensorBoard; the full
             statistics (per token type and per layer) -> router_stats.jsonl
    on_end   router_usage.png: track usage by token type, over training, and by layer; with a plot
             clock also its open rate by token type and over training

The model's `aux_loss()` (router load balancing, weight `router_aux_weight`) is added to the LM loss
by the trainer. The narrative signal table is built from the data dir's tokenizer and saved in the
checkpoint's state dict, so generate_text.py / evaluate.py need nothing else.
"""

import json
import os
import sys

import torch.distributed as tdist

from mamba_lm.configurator import apply_overrides
from mamba_lm.data import load_meta
from mamba_lm.errors import UserError, user_errors
from mamba_lm.models import build_model as build
from mamba_lm.report import plot_router_usage
from mamba_lm.trainer import data_tokenizer, train
from multitrack.multitrack_model import multitrack_config, parameter_report  # registers "multitrack"
from multitrack.narrative import TOKEN_TYPES, build_signal_tables

# ----------------------------------------------------------------------------------------------
# model
preset = "multitrack-130m"    # multitrack.multitrack_config.PRESETS: multitrack-130m | small-cpu | tiny
d_model = 0                   # override the preset's width (0: keep); d_inner re-derived to match the baseline [>=0]
n_layer = 0                   # override the preset's depth (0: keep) [>=0]
tracks = 3                    # SSM tracks (1: single track, multi-timescale Δ init only) [>=1]
track_dt = "1e-2:1e-1,1e-3:1e-2,1e-4:1e-3"  # Δ init range per track, fastest first (scene, character, plot)
dt_clamp_factor = 0.0         # 0: Δ free; f: clamp track g's Δ to dt_min_g / f .. dt_max_g * f [>=0]
router = "learned"            # learned | uniform (ablation: all tracks weight 1/G)
narrative_signals = True      # router sees token-id narrative signals (paragraphs, dialogue, headings)
cross_track = True            # per-position attention across tracks
router_aux_weight = 0.01      # router load-balancing loss weight (0: off) [>=0]
plot_clock = "off"            # off | signals | learned: plot track decays/written only at narrative boundaries
plot_clock_signals = "paragraph_break,heading,scene_mark"  # narrative features that open the plot clock
char_memory = False           # character track = gated delta-rule key-value memory instead of a selective scan
mem_heads = 0                 # heads of that memory (0: the preset's) [>=0]
mem_head_dim = 0              # key size per head of that memory (0: the preset's) [>=0]
# data and output
data_dir = "data/gutenberg-neox"  # prepared by prepare_data.py (seq_len and tokenizer come from its meta.json) [input folder]
out_dir = "out/multitrack"    # checkpoints and logs [output folder]
seq_len = 0                   # 0: the data's seq_len (1024 for the reference run) [>=0]
stateful = False              # each row reads whole books in order, its state carried between steps (truncated BPTT) and reset at each book's eos
loss_on = "all"               # all | answers: score only the answer tokens of a recall-gate data dir (the MQAR objective)
# optimization
batch_size = 8                # sequences per micro-batch [>=1]
grad_accum = 1                # micro-batches per optimizer step (global batch = batch_size * grad_accum) [>=1]
lr = 6e-4                     # peak learning rate [>0]
min_lr = 1e-5                 # cosine decay floor (mamba recipe) [>=0]
warmup_steps = 0              # 0: warmup_frac of the run [>=0]
warmup_frac = 0.02            # 2% linear warmup [0, 1]
epochs = 3                    # passes over the train split [>=0]
max_steps = 0                 # stop after this many optimizer steps (0: epochs decide); the LR schedule spans the budget [>=0]
max_tokens = 0                # stop after this many training tokens (0: no limit) [>=0]
weight_decay = 0.1            # on 2-D Linear weights only [>=0]
beta1 = 0.9                   # AdamW beta1 [0, 1)
beta2 = 0.95                  # AdamW beta2 [0, 1)
grad_clip = 1.0               # max global gradient norm (0: off) [>=0]
# evaluation and logging
eval_interval = 500           # steps between evals on a fixed val subset and ckpt_latest.pt (0: epoch ends only) [>=0]
eval_batches = 20             # batches in that fixed subset [>=1]
eval_max_batches = 0          # cap for the full val pass at each epoch end (0: whole split) [>=0]
log_interval = 10             # steps between log lines (log.txt, metrics.jsonl) [>=1]
tensorboard = True            # write tb/ event files
# system
seed = 1337                   # init and data order [>=0]
device = "auto"               # auto | cpu | cuda | cuda:N
dtype = "auto"                # auto: bf16 autocast on CUDA, fp32 on CPU | float32 | bfloat16 | float16
compile = False               # torch.compile (falls back to eager with a warning)
fsdp = False                  # under torchrun: FSDP instead of DDP (for larger models)
resume = False                # continue from out_dir/ckpt_latest.pt
overwrite = False             # allow starting over in an out_dir that holds a checkpoint
init_from = "scratch"         # scratch | resume | a repo .pt or an HF / mamba-ssm folder of this model type (fine-tune) [input path, or scratch | resume]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

LOGGED_TYPES = ("all", "dialogue", "narration", "paragraph_start")   # router stats in metrics.jsonl / log
CLOCK_LOGGED = ("boundary", "non_boundary")                           # plot-clock open rates, also logged


def parse_track_dt(spec: str) -> tuple[tuple, tuple]:
    """"1e-2:1e-1,1e-3:1e-2" -> ((1e-2, 1e-3), (1e-1, 1e-2)): per-track Δ minima and maxima."""
    try:
        pairs = [tuple(float(v) for v in part.split(":")) for part in spec.split(",")]
        assert pairs and all(len(p) == 2 for p in pairs)
    except (ValueError, AssertionError):
        raise UserError(f"--track_dt={spec!r}: expected min:max per track, comma-separated, "
                        f"e.g. 1e-2:1e-1,1e-3:1e-2,1e-4:1e-3") from None
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def build_model():
    """The multi-track model from its preset and switches, with the data tokenizer's signal table."""
    meta = load_meta(data_dir)
    dt_min, dt_max = parse_track_dt(track_dt)
    shape = {k: v for k, v in (("d_model", d_model), ("n_layer", n_layer), ("mem_heads", mem_heads),
                                ("mem_head_dim", mem_head_dim)) if v}
    cfg = multitrack_config(preset, vocab_size=meta["tokenizer"]["vocab_size"], tracks=tracks,
                            track_dt_min=dt_min, track_dt_max=dt_max, dt_clamp_factor=dt_clamp_factor,
                            router=router, narrative_signals=narrative_signals, cross_track=cross_track,
                            router_aux_weight=router_aux_weight, plot_clock=plot_clock,
                            plot_clock_signals=plot_clock_signals, char_memory=char_memory, **shape)
    print(parameter_report(cfg))
    model = build("multitrack", cfg)
    model.set_signal_table(build_signal_tables(data_tokenizer(data_dir, meta)))
    return model


def _is_main() -> bool:
    return not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0


def on_eval(model, step: int, out: str) -> dict:
    """Router statistics since the previous eval: a summary to log, the full dict to router_stats.jsonl."""
    stats = model.stats() if hasattr(model, "stats") else {}
    if not stats:
        return {}
    if _is_main():
        with open(os.path.join(out, "router_stats.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
    summary = {k: v for k, v in stats.items() if k.split("/")[1] in LOGGED_TYPES + CLOCK_LOGGED}
    if "router/frac/dialogue" in stats:
        summary["router/frac/dialogue"] = stats["router/frac/dialogue"]
    return summary


def on_end(model, out: str, history: list) -> None:
    """router_usage.png from router_stats.jsonl (rows of this run and of the runs it resumed)."""
    path = os.path.join(out, "router_stats.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    png = plot_router_usage(rows, os.path.join(out, "router_usage.png"), model.config.track_names, TOKEN_TYPES)
    print(f"wrote {png}" if png else "no router or plot-clock statistics to plot (router=uniform or tracks=1 "
                                     "without a plot clock, or no eval ran)")


if __name__ == "__main__":
    with user_errors():
        train(config, build_model, script="train_multitrack.py", on_eval=on_eval, on_end=on_end)
