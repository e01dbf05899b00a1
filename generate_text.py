"""Generate text from any checkpoint of the repository (or an HF / mamba-ssm Mamba folder).

    python generate_text.py --ckpt=out/demo/ckpt_best.pt --prompt="The storm had passed" --max_new_tokens=300
    python generate_text.py --ckpt=out/baseline/ckpt_best.pt --prompt_file=prompts.txt --num_samples=3
    python generate_text.py --ckpt=path/to/mamba-130m-hf --tokenizer=../shared/data/tokenizers/gpt-neox-20b/tokenizer.json

The model is rebuilt from the checkpoint alone (model_type + model_config + tokenizer). The prompt is
read by one parallel forward pass, then one recurrent `model.step` per token: memory stays constant
however long the story (10,000+ tokens). On CUDA the step runs as a CUDA graph. The first sample of
each prompt streams to stdout; all samples, with the model, checkpoint and every setting, are
appended to generations/generations_YYYYMMDD.md (a new dated section per run, never overwritten).

--prompt_file: prompts separated by lines containing only `---`. An empty prompt starts a new book
(the end-of-text token).
"""

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

import multitrack  # noqa: F401  (registers the "multitrack" model type: --ckpt may be any model)
from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import UserError, user_errors
from mamba_lm.generation import NonFiniteLogits, TextStreamer, generate, read_prompts
from mamba_lm.report import as_paragraphs, blockquote, write_markdown
from mamba_lm.runtime import resolve_device, resolve_dtype
from mamba_lm.weights import load_weights

# ----------------------------------------------------------------------------------------------
ckpt = "out/baseline/ckpt_best.pt"   # a repo checkpoint (.pt) or an HF / mamba-ssm Mamba folder [input path]
tokenizer = ""                       # tokenizer for folders that have none (tokenizer.json path or hub id)
prompt = "It was late in the evening when"  # the prompt ("" = start a new book)
prompt_file = ""                     # file of more prompts, separated by lines of --- [input file]
num_samples = 2                      # samples per prompt (generated as one batch) [>=1]
max_new_tokens = 400                 # tokens to generate per sample [>=1]
temperature = 0.8                    # 0 = greedy [>=0]
top_k = 0                            # keep the k most likely tokens (0 = off) [>=0]
top_p = 0.95                         # nucleus sampling mass (1.0 = off) (0, 1]
min_p = 0.0                          # drop tokens below min_p * p(best token) (0 = off) [0, 1]
repetition_penalty = 1.1             # CTRL penalty on tokens already in prompt or output (1.0 = off) [>0]
stop_at_eos = True                   # end a sample at the end-of-text token
seed = 1337                          # sampling seed [>=0]
device = "auto"                      # auto | cpu | cuda | cuda:N
dtype = "auto"                       # auto: bfloat16 on CUDA, float32 on CPU | float32 | bfloat16 | float16
cuda_graph = True                    # run the decode step as a CUDA graph (CUDA only)
compile = False                      # CPU: decode step via torch.compile (2-2.5x on small models, 10-30 s compile)
stream = True                        # print the first sample of each prompt as it is generated
generations_dir = "generations"      # where generations_YYYYMMDD.md goes [output folder]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def main():
    prompts = read_prompts(prompt, prompt_file)                 # a bad prompt file or an unwritable day file
    check_output_file(datetime.datetime.now(datetime.timezone.utc))  # fail before the model loads
    run_device = resolve_device(device)
    model, tok, info = load_weights(ckpt, device=run_device, tokenizer=tokenizer or None)
    if tok is None:
        raise UserError(f"{ckpt} comes without a tokenizer; pass --tokenizer=<tokenizer.json path or hub id>")
    check_finite_weights(model)
    weights_dtype = resolve_dtype(dtype, run_device)
    model = model.to(weights_dtype).eval()
    generator = torch.Generator(device=run_device).manual_seed(seed)
    summary = model_summary(info)
    print(f"{summary}\nsampling {num_samples} x {max_new_tokens} tokens for {len(prompts)} prompt(s) on "
          f"{run_device} ({str(weights_dtype).replace('torch.', '')})", file=sys.stderr)

    results = []
    for i, text in enumerate(prompts):
        ids = tok.encode(text) if text else [tok.eos_id]
        prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long, device=run_device)
        streamer = TextStreamer(tok) if stream else None
        if streamer:
            print(f"\n--- prompt {i + 1}/{len(prompts)}, sample 1/{num_samples} ---\n{text}", end="", flush=True)
        t0 = time.time()
        try:
            out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty,
                           eos_id=tok.eos_id if stop_at_eos else None, generator=generator, on_token=streamer,
                           cuda_graph=cuda_graph, vocab_size=tok.vocab_size, compile=compile)
        except NonFiniteLogits as e:
            if streamer:
                print(file=sys.stderr)
            hint = "; --dtype=float32 may avoid the overflow" if weights_dtype != torch.float32 else ""
            raise UserError(f"{ckpt}: {e} (prompt {i + 1}){hint}; nothing was written") from None
        seconds = time.time() - t0
        if streamer:
            streamer.end()
        samples = []
        for row in out[:, len(ids):].tolist():
            if stop_at_eos and tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            samples.append((tok.decode(row), len(row)))
        new_tokens = (out.size(1) - len(ids)) * num_samples
        results.append((text, samples, new_tokens / max(seconds, 1e-9)))

    stamp = datetime.datetime.now(datetime.timezone.utc)
    path = check_output_file(stamp)
    body = [f"- **model**: {summary}\n- **checkpoint**: `{ckpt}`{checkpoint_line(info)}\n"
            f"- **tokenizer**: {tok.name} (vocab {tok.vocab_size})\n- **settings**:",
            "```json\n" + json.dumps(config) + "\n```"]
    for i, (text, samples, tok_s) in enumerate(results):
        body.append(f"### Prompt {i + 1}\n\n" + (blockquote(f"**{text.strip()}**") if text.strip()
                                                   else "> *(no prompt: a new book)*"))
        for j, (sample, n) in enumerate(samples):
            body.append(f"**Sample {j + 1}** ({n} tokens, {tok_s:,.0f} tok/s for the batch)\n\n"
                        f"{as_paragraphs(text + sample) if text else as_paragraphs(sample)}")
    heading = f"{stamp:%Y-%m-%d %H:%M:%S} UTC — {Path(ckpt).parent.name}/{Path(ckpt).name}"
    try:
        write_markdown(path, "Generated samples", [(heading, "\n\n".join(body))])
    except OSError as e:  # checked before sampling, but a disk can fill up meanwhile: keep the samples
        print(f"## {heading}\n\n" + "\n\n".join(body))
        raise UserError(f"cannot write {e.filename or path} ({e.strerror}); the samples are printed above") from None
    print(f"wrote {path}", file=sys.stderr)


def check_output_file(stamp) -> Path:
    """generations_YYYYMMDD.md of `stamp`; UserError before any work when it cannot be written.
    (--generations_dir itself, writable and not the working directory, is checked by apply_overrides.)"""
    path = Path(generations_dir) / f"generations_{stamp:%Y%m%d}.md"
    if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path} ({'a folder' if path.is_dir() else 'permission denied'}); "
                        "choose another --generations_dir")
    return path


def check_finite_weights(model) -> None:
    """Refuse weights that hold NaN / inf (a diverged run's checkpoint) before sampling from them."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"{ckpt} holds non-finite weights (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}; "
                        "it cannot generate text: use an earlier checkpoint (e.g. ckpt_best.pt)")


def model_summary(info) -> str:
    """'mamba (d_model 256, n_layer 4, vocab 4096), 3,456,789 params' from a weights.WeightsInfo."""
    cfg = info.model_config or {}
    shape = ", ".join(f"{k} {cfg[k]}" for k in ("d_model", "n_layer", "d_state", "vocab_size") if k in cfg)
    return f"{info.model_type} ({shape}), {info.num_params or 0:,} params"


def checkpoint_line(info) -> str:
    """' — step 300, 1,228,800 tokens seen, val loss 2.013 (ppl 7.49), train_baseline.py on data/demo'
    from a weights.WeightsInfo (a folder: ' — hf folder')."""
    parts = []
    if info.step is not None:
        parts.append(f"step {info.step:,}")
    if info.tokens_seen is not None:
        parts.append(f"{info.tokens_seen:,} tokens seen")
    metrics = info.metrics or {}
    loss = metrics.get("val_loss_full", metrics.get("val_loss"))
    ppl = metrics.get("val_ppl_full", metrics.get("val_ppl"))
    if loss is not None:
        parts.append(f"val loss {loss:.4f} (ppl {ppl:.2f})")
    data = (info.data or {}).get("dir")
    source = info.script or ("checkpoint" if info.layout == "repo" else f"{info.layout} folder")
    parts.append(f"{source} on {data}" if data else source)
    return (" — " + ", ".join(parts)) if parts else ""


if __name__ == "__main__":
    with user_errors():
        main()
