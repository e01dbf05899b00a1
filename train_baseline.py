"""Train the plain Mamba baseline on a prepared data dir.

    python prepare_data.py --source=demo                       # offline demo corpus -> data/demo (~5 s)
    python train_baseline.py --preset=small-cpu --data_dir=data/demo --out_dir=out/demo --seq_len=256 \
        --max_steps=60 --eval_interval=20                      # 2.2M params, ~6 min on 2 busy CPU cores, val loss ~1.7
    python train_baseline.py --preset=small-cpu --data_dir=data/demo --out_dir=out/demo --seq_len=256 \
        --max_steps=60 --eval_interval=20 --resume=True         # continue exactly: the same flags plus --resume=True
    torchrun --nproc_per_node=4 train_baseline.py --data_dir=data/gutenberg-neox   # DDP, same global batch

The reference run: preset mamba-130m (126.9M params, NeoX tokenizer), global batch 8 x 1024 tokens,
AdamW(0.9, 0.95) lr 6e-4 with 2% warmup and cosine decay to 1e-5, weight decay 0.1, grad clip 1.0,
3 epochs. Outputs go to out_dir: ckpt_latest.pt / ckpt_best.pt, metrics.jsonl, log.txt, epochs.md,
epochs.csv, loss.png, tb/ (see mamba_lm/trainer.py, where the loop lives).

Ctrl-C (SIGINT) or SIGTERM saves ckpt_latest.pt after the current step and exits with status 130 / 143
(128 + signal, as shells and schedulers expect); a second Ctrl-C aborts at once without saving. A NaN/inf
training or validation loss stops with `error: training diverged ...` (exit 2) without saving; the message names
the step of the ckpt_latest.pt that is intact. Every flag, the data dir, --init_from and the model are checked
before anything in out_dir is deleted or written (also with --overwrite=True).

Weight decay applies only to the 2-D weights of nn.Linear layers (in_proj, x_proj, dt_proj, out_proj);
no decay on the embedding (= the tied lm_head), RMSNorm weights, biases, the conv1d kernel, A_log, D,
dt_proj.bias. The group sizes are printed at start.
"""

import sys

import multitrack  # noqa: F401  (registers "multitrack": an --init_from of that type is refused by name)
from mamba_lm.configurator import apply_overrides
from mamba_lm.data import load_meta
from mamba_lm.errors import user_errors
from mamba_lm.mamba import mamba_config
from mamba_lm.models import build_model as build
from mamba_lm.trainer import train

# ----------------------------------------------------------------------------------------------
# model
preset = "mamba-130m"         # mamba_lm.mamba.PRESETS: mamba-130m | mamba-130m-ssm | small-cpu | tiny
d_model = 0                   # override the preset's width (0: keep) [>=0]
n_layer = 0                   # override the preset's depth (0: keep) [>=0]
# data and output
data_dir = "data/gutenberg-neox"  # prepared by prepare_data.py (seq_len and tokenizer come from its meta.json) [input folder]
out_dir = "out/baseline"      # checkpoints and logs [output folder]
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


def build_model():
    """The baseline from its preset, with the data tokenizer's vocabulary."""
    shape = {k: v for k, v in (("d_model", d_model), ("n_layer", n_layer)) if v}
    vocab_size = load_meta(data_dir)["tokenizer"]["vocab_size"]
    return build("mamba", mamba_config(preset, vocab_size=vocab_size, **shape))


if __name__ == "__main__":
    with user_errors():
        train(config, build_model, script="train_baseline.py")
