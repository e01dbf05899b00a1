"""Evaluate language-model checkpoints on long-form narrative, side by side, into one markdown report.

    python evaluate.py --ckpts=out/baseline/ckpt_best.pt --data_dir=data/gutenberg-neox
    python evaluate.py --ckpts=out/baseline/ckpt_best.pt,out/multitrack/ckpt_best.pt --names=baseline,multitrack
    python evaluate.py --ckpts=exports/mamba-130m --stages=loss,books      # an HF / mamba-ssm folder
    python evaluate.py --ckpts=... --max_sequences=0 --max_books=0 --resume=True   # whole split, resumable

Stages (`--stages=`, comma-separated; each one is cached, so `--resume=True` skips finished ones):
    loss        token loss / perplexity, bits per byte, PG-19 word perplexity on `split`; the mean loss
                at every position 0..L-1 of the training context (table by log2 buckets + PNG); loss by
                narrative token type (dialogue, narration, paragraph starts, ...; multitrack/narrative.py)
    books       beyond the training length: the first `book_tokens` tokens of each book (0: all), in windows of
                the training length, with the recurrent state carried across windows vs reset at each
                window; loss by window index (distance into the book), table + PNG
    generation  samples from held-out book openings (fixed sampling settings and seed): distinct-n,
                seq-rep-n, rep/l, length before the first loop, character-name consistency; the real
                continuation of each book is scored the same way as a reference row
    recall      long-range recall probe on procedural demo stories (mamba_lm.demo_corpus): is a
                character's name/trait stated thousands of tokens earlier predicted at the cue?
    longrange   whole books read window by window, the state carried through the book vs reset every
                `window` tokens: loss on recurring proper names by token distance to their previous
                mention (<256, 256-1k, 1k-4k, 4k-16k, >=16k), and loss by position up to
                `position_tokens` (64k) into each book (log2 buckets)
    chapters    next-chapter ranking (ChapterBreak, arXiv 2204.10878): at each chapter heading, the true
                opening of the next chapter against openings of later chapters of the same book, scored
                given the book so far (carried) vs the last window only (reset); accuracy and mean rank
The default runs the first four; the long-range pair reads whole books, so ask for it:
    python evaluate.py --ckpts=a.pt,b.pt --names=a,b --stages=longrange,chapters --longrange_books=16

Output: `reports/eval_<timestamp>.md` (or `--out=`), PNGs and a `.json` of every number beside it.
Results go to `state_dir` after each stage (and the running sums of the loss, books, longrange and chapters stages every
`save_every` seconds), keyed by checkpoint file + data fingerprint + the stage's settings; a re-run
with `--resume=True` reuses the finished stages whose key matches and continues an interrupted one.
Stages and their resume cache: mamba_lm/evaluation.py; the report: mamba_lm/eval_report.py; metric
definitions: mamba_lm/metrics.py and mamba_lm/longrange.py.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch

import multitrack  # noqa: F401  (registers the "multitrack" model type: --ckpts may hold any model)
from mamba_lm import eval_report as R
from mamba_lm import evaluation as E
from mamba_lm.configurator import apply_overrides
from mamba_lm.data import TokenSplit, check_tokenizer_match, load_meta
from mamba_lm.errors import UserError, user_errors
from mamba_lm.evaluation import save_state
from mamba_lm.report import write_markdown
from mamba_lm.runtime import DTYPES, resolve_device
from mamba_lm.runtime import autocast as runtime_autocast
from mamba_lm.tokenizer import load_tokenizer
from mamba_lm.weights import check_data_tokenizer, describe_weights, load_weights
from multitrack.narrative import TOKEN_TYPES, build_signal_tables, narrative_features

# -----------------------------------------------------------------------------
ckpts = "out/baseline/ckpt_best.pt"    # comma-separated: repo .pt checkpoints and/or HF / mamba-ssm folders [input paths]
names = ""                  # comma-separated display names, one per checkpoint (default: from the paths)
data_dir = "data/gutenberg-neox" # prepared data dir (prepare_data.py); its tokenizer must match every checkpoint [input folder]
split = "test"              # split to evaluate: val | test
stages = "loss,books,generation,recall"  # which stages to run (see the docstring)
out = ""                    # report path (.md); default reports/eval_<UTC timestamp>.md [output file]
state_dir = "reports/.eval_state"  # partial results per checkpoint+data+settings (for --resume) [output folder]
resume = False              # reuse finished stages from state_dir whose checkpoint, data and settings match,
                            # and continue an interrupted loss/books stage from its last partial save
save_every = 60.0           # seconds between partial saves inside the loss, books and long-range stages (0 = always) [>=0]
device = "auto"             # auto | cpu | cuda | cuda:1 ...
dtype = "float32"           # float32 | bfloat16 (autocast; losses are always computed in float32)
seed = 1337                 # sampling seed (generation) and probe-story seed offset (recall) [>=0]
# loss stage
seq_len = 0                 # evaluation context length; 0 = the data's seq_len (the training length) [>=0]
batch_size = 4              # sequences per forward [>=1]
max_sequences = 512         # cap on evaluated sequences, evenly spaced over the split (0 = all) [>=0]
# books stage (beyond the training length)
book_tokens = 16384         # tokens scored per book (its first book_tokens tokens; 0 = whole books) [>=0]
window = 0                  # window length for carried/reset evaluation; 0 = seq_len [>=0]
max_books = 32              # books evaluated (the first ones of the split longer than one window; 0 = all) [>=0]
book_batch_size = 4         # books per forward [>=1]
# generation stage
num_prompts = 16            # book openings used as prompts (books long enough for prompt + continuation) [>=1]
prompt_tokens = 256         # prompt: the first prompt_tokens tokens of the book [>=1]
gen_tokens = 256            # generated tokens per prompt [>=1]
gen_batch_size = 8          # prompts generated together [>=1]
temperature = 1.0           # sampling settings, the same for every checkpoint [>=0]
top_k = 0                   # 0 = off [>=0]
top_p = 0.9                 # nucleus sampling (Holtzman et al. 2020); 1.0 = off (0, 1]
min_p = 0.0                 # 0 = off [0, 1]
repetition_penalty = 1.0    # 1.0 = off (CTRL-style penalty would hide degeneration) [>0]
loop_min_period = 4         # a loop: a block of >= loop_min_period tokens ... [>=1]
loop_repeats = 3            # ... repeated loop_repeats times back to back [>=2]
# recall stage
recall_stories = 16         # procedural demo stories generated for the probe [>=1]
recall_story_words = 6000   # approximate length of each story in words (when not using the demo data's own books) [>=1]
recall_seed = 271828        # seed of the fresh stories (never the demo data's training books) [>=0]
recall_distance_edges = "0,256,1024,2048,4096,8192"  # distance buckets (tokens between fact and cue)
# long-range stages (longrange, chapters): whole books, the state carried through the book vs reset every window
longrange_books = 16        # books read (the split's first ones; 0 = all) [>=0]
longrange_tokens = 0        # tokens read per book (its first ones; 0 = the whole book) [>=0]
position_tokens = 65536     # longrange: per-position loss up to this many tokens into each book (log2 buckets) [>=1]
chapter_tokens = 128        # chapters: tokens of each chapter opening that are scored [>=2]
chapter_candidates = 6      # chapters: candidates per break (the true opening + openings of later chapters) [>=2]
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# setup: device, data, checkpoints


def autocast(dev: torch.device):
    """runtime.autocast for --dtype, which evaluate.py allows only as float32 or bfloat16."""
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={dtype!r} is not supported; use float32 or bfloat16")
    return runtime_autocast(dev, DTYPES[dtype])


def parse_stages(spec: str) -> list[str]:
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in E.STAGES]
    if unknown or not chosen:
        raise UserError(f"--stages: unknown {unknown or spec!r}; choose from {','.join(E.STAGES)}")
    return [s for s in E.STAGES if s in chosen]


def check_long_range_settings(chosen: list[str], win: int) -> None:
    """UserError (before any work) for settings the long-range stages cannot use."""
    if "longrange" in chosen and position_tokens < 1:
        raise UserError(f"--position_tokens={position_tokens}: must be >= 1 (65536 = 64k tokens into each book)")
    if "chapters" in chosen:
        if not 2 <= chapter_tokens < win:
            raise UserError(f"--chapter_tokens={chapter_tokens}: must be >= 2 and below the window ({win} tokens)")
        if chapter_candidates < 2:
            raise UserError(f"--chapter_candidates={chapter_candidates}: must be >= 2 (the true opening + others)")


def checkpoint_list(paths_spec: str, names_spec: str) -> list[tuple[str, str]]:
    """[(name, path)] from the comma-separated --ckpts / --names."""
    paths = [p.strip() for p in paths_spec.split(",") if p.strip()]
    if not paths:
        raise UserError("--ckpts is empty; pass one or more checkpoints, e.g. --ckpts=out/baseline/ckpt_best.pt")
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"checkpoint {p} not found (a .pt file or an HF / mamba-ssm folder)")
    given = [n.strip() for n in names_spec.split(",") if n.strip()]
    if given and len(given) != len(paths):
        raise UserError(f"--names has {len(given)} names for {len(paths)} checkpoints")
    default = []
    for p in paths:
        pp = Path(p)
        default.append(pp.name if pp.is_dir() else f"{pp.parent.name}/{pp.stem}" if pp.parent.name else pp.stem)
    chosen = given or default
    if len(set(chosen)) != len(chosen):
        chosen = [f"{n} ({i})" for i, n in enumerate(chosen)]
    return list(zip(chosen, paths))


def load_model(path: str, dev: torch.device, meta: dict):
    """(model, tokenizer, info) from a repo .pt or an HF / mamba-ssm folder; UserError on a tokenizer mismatch."""
    model, tokenizer, info = load_weights(path, device=dev)
    check_model_tokenizer(path, tokenizer.to_dict() if tokenizer is not None else None, info, meta)
    if tokenizer is None:  # a folder without tokenizer.json (state-spaces/mamba-*): use the data's
        tokenizer = data_tokenizer(meta)
        info.tokenizer_source = "data dir (the folder has none)"
    model.eval()
    return model, tokenizer, info


def check_model_tokenizer(path: str, model_tokenizer: dict | None, info, meta: dict) -> None:
    """UserError naming `path` when the model's tokenizer (or, for a folder without one, its
    vocabulary size) does not match the data's. info: a weights.WeightsInfo."""
    try:
        if model_tokenizer is not None:
            check_tokenizer_match(meta["tokenizer"], model_tokenizer)
        else:
            check_data_tokenizer(info, meta["tokenizer"], data_dir)
    except UserError as e:
        raise UserError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def precheck_tokenizers(pairs: list[tuple[str, str]], meta: dict) -> None:
    """Tokenizer check of every checkpoint and folder before the first forward (folders: from their
    config.json and tokenizer.json, without reading the weights)."""
    for _name, path in pairs:
        info = describe_weights(path)                    # the metadata, without reading the weights
        tok = info.tokenizer if isinstance(info.tokenizer, dict) else None
        check_model_tokenizer(path, tok, info, meta)


def data_tokenizer(meta: dict):
    """The data dir's own tokenizer (byte, or its tokenizer.json copy)."""
    if meta["tokenizer"].get("kind") == "byte":
        return load_tokenizer("byte")
    path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{data_dir} has no tokenizer.json; re-create it with prepare_data.py")
    return load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# main


def main() -> None:
    chosen = parse_stages(stages)
    dev = resolve_device(device)
    autocast(dev)                                   # bad --dtype / --recall_distance_edges: an error now,
    if "recall" in chosen:                          # not a stage skipped for every checkpoint
        E.distance_edges(recall_distance_edges)
    pairs = checkpoint_list(ckpts, names)
    meta = load_meta(data_dir)
    if split not in meta.get("splits", {}):
        raise UserError(f"--split={split!r} not in {data_dir} (has {', '.join(meta.get('splits', {}))})")
    data = TokenSplit(data_dir, split, seq_len=seq_len or None)
    L = data.seq_len
    win = window or L
    check_long_range_settings(chosen, win)
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    out_md = Path(out or f"reports/eval_{stamp}.md")
    if out_md.suffix != ".md":
        out_md = out_md.with_suffix(".md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    precheck_tokenizers(pairs, meta)                # fail before any work, not after the first checkpoint
    results, infos, notes = {}, {}, []
    for name, path in pairs:
        print(f"== {name}: {path}")
        model, tokenizer, info = load_model(path, dev, meta)
        infos[name] = info
        results[name] = evaluate_checkpoint(name, path, model, tokenizer, data, meta, dev, chosen, L, win, notes)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not any(not r.get("skipped") for res in results.values() for r in res.values()):
        raise UserError("no stage produced a result for any checkpoint (" + "; ".join(notes)[:400]
                        + "); no report written")
    pngs = R.write_plots(results, out_md, split)
    infos_json = {n: {k: v for k, v in i.to_dict().items() if k not in ("train_config", "model_config", "source_config")}
                  for n, i in infos.items()}
    out_json = out_md.with_suffix(".json")
    save_state(out_json, {"config": config, "checkpoints": infos_json, "results": results,
                          "data": {"dir": data_dir, "split": split, "fingerprint": meta.get("fingerprint")}})
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    sections = R.report_sections(results, infos, meta, win, L, pngs, notes, device_name, config)
    write_markdown(out_md, f"Evaluation: {', '.join(n for n, _ in pairs)}", sections, append=False)
    print(f"wrote {out_md}" + "".join(f", {p}" for p in pngs.values() if p) + f", {out_json}")


def evaluate_checkpoint(name, path, model, tokenizer, data, meta, dev, chosen, L, win, notes) -> dict:
    """{stage: result} of one checkpoint: finished stages come from the resume cache, the others run
    (an interrupted one continues from its partial sums); each result is cached as soon as it is done."""
    st_path = E.state_path(state_dir, E.file_identity(path), meta.get("fingerprint", ""), split)
    state = E.load_state(st_path, resume)
    state.update({"checkpoint": path, "data_dir": data_dir, "fingerprint": meta.get("fingerprint"), "split": split})
    partial = state.setdefault("partial", {})
    results = {}
    for stage in chosen:
        key = E.stage_settings(stage, config, L, win)
        cached = state["stages"].get(stage)
        if cached and cached.get("settings") == key:
            print(f"   {stage}: reusing finished results from {st_path}")
            results[stage] = cached["result"]
            continue
        t0 = time.time()
        saved = partial.get(stage) if (partial.get(stage) or {}).get("settings") == key else None

        def save_partial(acc, stage=stage, key=key):              # survives a crash inside the stage
            partial[stage] = {"settings": key, "progress": acc}
            save_state(st_path, state)

        progress = E.Progress(saved["progress"] if saved else None, save_partial, save_every)
        try:
            res = run_stage(stage, model, tokenizer, data, meta, dev, win, progress)
        except (UserError, ImportError) as e:
            notes.append(f"{name}: stage {stage} skipped: {e}")
            print(f"   {stage}: skipped ({e})")
            continue
        broken = [k for k in ("loss", "carried_beyond", "accuracy") if not math.isfinite(res.get(k, 0.0))]
        if broken:                                          # never report (or cache) a NaN as a result
            notes.append(f"{name}: stage {stage} skipped: non-finite {broken[0]} (NaN or inf): broken weights")
            print(f"   {stage}: skipped (non-finite {broken[0]})")
            continue
        res["seconds"] = round(time.time() - t0, 2)
        if res.get("skipped"):
            notes.append(f"{name}: stage {stage} skipped: {res['skipped']}")
        results[stage] = res
        state["stages"][stage] = {"settings": key, "result": res}
        partial.pop(stage, None)
        save_state(st_path, state)                          # finished stages survive a later crash
        print(f"   {stage}: done in {res['seconds']:.1f}s" + R.headline(stage, res))
    return results


def narrative_token_types(tokenizer, dev):
    """(token type names, types_of(x, y) -> (B, L, n_types) bool) from multitrack.narrative, for the loss
    stage's loss by token type. Types are computed over x[:, :1] + y (the sequence's first input gives the
    first target its context); the dialogue state before each sequence is unknown and taken as outside."""
    table = build_signal_tables(tokenizer).to(dev)                          # (V, columns)

    def types_of(x, y):
        ids = torch.cat([x[:, :1], y], dim=1)                                # (B, L + 1)
        _, types, _ = narrative_features(table[ids])
        return types[:, 1:]

    return TOKEN_TYPES, types_of


def run_stage(stage, model, tokenizer, data, meta, dev, win, progress) -> dict:
    """One stage's result dict (mamba_lm/evaluation.py) with this run's settings."""
    amp = lambda: autocast(dev)  # noqa: E731
    if stage == "loss":
        return E.eval_loss(model, tokenizer, data, config, amp, progress, narrative_token_types(tokenizer, dev))
    if stage == "books":
        return E.eval_books(model, tokenizer, data, config, amp, win, progress)
    if stage == "generation":
        return E.eval_generation(model, tokenizer, data, config, amp)
    if stage == "recall":
        return E.eval_recall(model, tokenizer, meta, config, amp, win)
    if stage == "longrange":
        return E.eval_longrange(model, tokenizer, data, config, amp, win, progress)
    return E.eval_chapters(model, tokenizer, data, config, amp, win, progress)


if __name__ == "__main__":
    with user_errors():
        main()
