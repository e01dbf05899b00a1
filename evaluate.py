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

Output: `reports/eval_<timestamp>.md` (or `--out=`), PNGs and a `.json` of every number beside it.
Results go to `state_dir` after each stage (and the running sums of the loss and books stages every
`save_every` seconds), keyed by checkpoint file + data fingerprint + the stage's settings; a re-run
with `--resume=True` reuses the finished stages whose key matches and continues an interrupted one.
Metric definitions: mamba_lm/metrics.py.
"""

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mamba_lm.configurator import apply_overrides
from mamba_lm.errors import UserError, user_errors
from mamba_lm import metrics as M
from mamba_lm.report import as_paragraphs, blockquote, pyplot, save_figure, write_markdown

# -----------------------------------------------------------------------------
ckpts = "out/baseline/ckpt_best.pt"    # comma-separated: repo .pt checkpoints and/or HF / mamba-ssm folders
names = ""                  # comma-separated display names, one per checkpoint (default: from the paths)
data_dir = "data/gutenberg-neox" # prepared data dir (prepare_data.py); its tokenizer must match every checkpoint
split = "test"              # split to evaluate: val | test
stages = "loss,books,generation,recall"  # which stages to run (see the docstring)
out = ""                    # report path (.md); default reports/eval_<UTC timestamp>.md
state_dir = "reports/.eval_state"  # partial results per checkpoint+data+settings (for --resume)
resume = False              # reuse finished stages from state_dir whose checkpoint, data and settings match,
                            # and continue an interrupted loss/books stage from its last partial save
save_every = 60.0           # seconds between partial saves inside the loss and books stages (0 = every batch)
device = "auto"             # auto | cpu | cuda | cuda:1 ...
dtype = "float32"           # float32 | bfloat16 (autocast; losses are always computed in float32)
seed = 1337                 # sampling seed (generation) and probe-story seed offset (recall)
# loss stage
seq_len = 0                 # evaluation context length; 0 = the data's seq_len (the training length)
batch_size = 4              # sequences per forward
max_sequences = 512         # cap on evaluated sequences, evenly spaced over the split (0 = all)
# books stage (beyond the training length)
book_tokens = 16384         # tokens scored per book (its first book_tokens tokens; 0 = whole books)
window = 0                  # window length for carried/reset evaluation; 0 = seq_len
max_books = 32              # books evaluated (the first ones of the split longer than one window; 0 = all)
book_batch_size = 4         # books per forward
# generation stage
num_prompts = 16            # book openings used as prompts (books long enough for prompt + continuation)
prompt_tokens = 256         # prompt: the first prompt_tokens tokens of the book
gen_tokens = 256            # generated tokens per prompt
gen_batch_size = 8          # prompts generated together
temperature = 1.0           # sampling settings, the same for every checkpoint
top_k = 0                   # 0 = off
top_p = 0.9                 # nucleus sampling (Holtzman et al. 2020); 1.0 = off
min_p = 0.0                 # 0 = off
repetition_penalty = 1.0    # 1.0 = off (CTRL-style penalty would hide degeneration)
loop_min_period = 4         # a loop: a block of >= loop_min_period tokens ...
loop_repeats = 3            # ... repeated loop_repeats times back to back
# recall stage
recall_stories = 16         # procedural demo stories generated for the probe
recall_story_words = 6000   # approximate length of each story in words (when not using the demo data's own books)
recall_seed = 271828        # seed of the fresh stories (never the demo data's training books)
recall_distance_edges = "0,256,1024,2048,4096,8192"  # distance buckets (tokens between fact and cue)
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

STAGES = ("loss", "books", "generation", "recall")
STATE_FORMAT = "mamba-narrative-eval-state/1"


# ---------------------------------------------------------------------------------------------
# setup: device, data, checkpoints


def autocast(dev: torch.device):
    if dtype == "float32":
        return torch.autocast(dev.type, enabled=False)
    if dtype == "bfloat16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    raise UserError(f"--dtype={dtype!r} is not supported; use float32 or bfloat16")


def parse_stages(spec: str) -> list[str]:
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise UserError(f"--stages: unknown {unknown or spec!r}; choose from {','.join(STAGES)}")
    return [s for s in STAGES if s in chosen]


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


def file_identity(path: str) -> dict:
    """Cheap identity of a checkpoint file or folder: resolved path, sizes and mtimes."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def load_model(path: str, dev: torch.device, meta: dict):
    """(model, tokenizer, info) from a repo .pt or an HF / mamba-ssm folder; UserError on a tokenizer mismatch."""
    from mamba_lm.checkpoint import load_any_model

    model, tokenizer, info = load_any_model(path, device=dev)
    check_model_tokenizer(path, tokenizer.to_dict() if tokenizer is not None else None, info, meta)
    if tokenizer is None:  # a folder without tokenizer.json (state-spaces/mamba-*): use the data's
        tokenizer = data_tokenizer(meta)
        info["tokenizer_source"] = "data dir (the folder has none)"
    model.eval()
    return model, tokenizer, info


def check_model_tokenizer(path: str, model_tokenizer: dict | None, info: dict, meta: dict) -> None:
    """UserError naming `path` when the model's tokenizer (or, for a folder without one, its
    vocabulary size) does not match the data's."""
    from mamba_lm.data import check_tokenizer_match
    from mamba_lm.interop import check_data_tokenizer

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
    from mamba_lm.checkpoint import load_checkpoint
    from mamba_lm.interop import describe_folder

    for _name, path in pairs:
        if Path(path).is_file():
            ckpt = load_checkpoint(path, mmap=True)        # the metadata, without reading the weights
            check_model_tokenizer(path, ckpt.get("tokenizer") or {}, {}, meta)
            del ckpt
        else:
            info = describe_folder(path)
            tok = info["tokenizer"] if isinstance(info["tokenizer"], dict) else None
            check_model_tokenizer(path, tok, info, meta)


def data_tokenizer(meta: dict):
    """The data dir's own tokenizer (byte, or its tokenizer.json copy)."""
    from mamba_lm.tokenizer import load_tokenizer

    if meta["tokenizer"].get("kind") == "byte":
        return load_tokenizer("byte")
    path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{data_dir} has no tokenizer.json; re-create it with prepare_data.py")
    return load_tokenizer(path)


def state_path(ckpt_identity: dict, data_fingerprint: str) -> Path:
    key = hashlib.sha256(json.dumps([ckpt_identity, data_fingerprint, split], sort_keys=True).encode()).hexdigest()
    return Path(state_dir) / f"{key[:24]}.json"


def load_state(path: Path) -> dict:
    if not (resume and path.exists()):
        return {"format": STATE_FORMAT, "stages": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        print(f"warning: unreadable partial results {path}; recomputing")
        return {"format": STATE_FORMAT, "stages": {}}
    return state if state.get("format") == STATE_FORMAT else {"format": STATE_FORMAT, "stages": {}}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def stage_settings(stage: str, L: int, win: int) -> dict:
    """The settings a stage's numbers depend on (its cache key)."""
    common = {"dtype": dtype}
    if stage == "loss":
        return {**common, "seq_len": L, "max_sequences": max_sequences}
    if stage == "books":
        return {**common, "book_tokens": book_tokens, "window": win, "max_books": max_books}
    if stage == "generation":
        return {**common, "num_prompts": num_prompts, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                "repetition_penalty": repetition_penalty, "seed": seed, "loop_min_period": loop_min_period,
                "loop_repeats": loop_repeats}
    return {**common, "recall_stories": recall_stories, "recall_story_words": recall_story_words,
            "recall_seed": recall_seed, "edges": recall_distance_edges, "window": win}


# ---------------------------------------------------------------------------------------------
# stage: token loss, bits per byte, word perplexity, per-position loss


def target_pieces(row: np.ndarray, tokenizer) -> list[str]:
    """Text of a row of target ids as pieces; an end-of-text id becomes a paragraph break (book boundary)."""
    pieces, seg = [], []
    for t in row.tolist():
        if t == tokenizer.eos_id:
            if seg:
                pieces.append(tokenizer.decode(seg))
            pieces.append("\n\n")
            seg = []
        else:
            seg.append(t)
    if seg:
        pieces.append(tokenizer.decode(seg))
    return pieces


class Progress:
    """Resumable accumulators of a running stage: `saved` (a JSON dict from an interrupted run, or None)
    seeds them; `tick(make)` hands `make()` (the current accumulators, JSON-safe) to `save` at most every
    `save_every` seconds. Sums are float64 and JSON round-trips floats exactly, so a resumed stage gives
    the same numbers as an uninterrupted one."""

    def __init__(self, saved: dict | None = None, save=None):
        self.saved, self.save, self.last = saved, save, time.time()

    def tick(self, make) -> None:
        if self.save is not None and time.time() - self.last >= save_every:
            self.save(make())
            self.last = time.time()


def eval_loss(model, tokenizer, data, dev, progress: Progress | None = None) -> dict:
    """Token loss, bits per byte, word perplexity and per-position loss over (a cap of) the split's sequences.

    Memory: one batch of logits (batch_size, L, V) at a time plus (L,) position sums. `progress`:
    partial sums are saved every `save_every` seconds and a re-run continues from them.
    """
    L, V = data.seq_len, tokenizer.vocab_size
    n = data.num_sequences
    if n == 0:
        raise UserError(f"split {split!r} of {data_dir} has no full sequence of {L} tokens")
    if max_sequences and max_sequences < n:
        indices = np.unique(np.linspace(0, n - 1, max_sequences).round().astype(np.int64))
    else:
        indices = np.arange(n)
    byte_len = M.token_byte_lengths(tokenizer, skip_ids=[tokenizer.eos_id])
    signal_table, type_names = token_type_table(tokenizer, dev)
    type_sum, type_count = np.zeros(len(type_names)), np.zeros(len(type_names))
    pos_sum, pos_count = np.zeros(L), np.zeros(L)
    total_nll, total_bytes, total_words = 0.0, 0, 0
    prev_index, prev_in_word = None, False
    start = 0
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        p = progress.saved
        start, total_nll, total_bytes, total_words = p["next"], p["total_nll"], p["total_bytes"], p["total_words"]
        prev_index, prev_in_word = p["prev_index"], p["prev_in_word"]
        pos_sum, pos_count = np.array(p["pos_sum"]), np.array(p["pos_count"])
        type_sum, type_count = np.array(p["type_sum"]), np.array(p["type_count"])
        print(f"   loss: continuing from sequence {start:,} of {len(indices):,} (partial results)")
    bar = tqdm(total=len(indices) * L, initial=start * L, unit="tok", unit_scale=True, desc="loss",
               dynamic_ncols=True)
    for b in range(start, len(indices), batch_size):
        batch = indices[b:b + batch_size]
        x, y = data.get_batch(batch, device=dev)
        with torch.no_grad(), autocast(dev):
            nll = M.token_nll(model, x, y, V)                                  # (B, L)
        nll64 = nll.double().cpu().numpy()
        pos_sum += nll64.sum(0)
        pos_count += len(batch)
        total_nll += float(nll64.sum())
        if signal_table is not None:
            types = target_token_types(signal_table, x, y).double()            # (B, L, n_types)
            type_sum += torch.einsum("bl,blt->t", nll.double(), types).cpu().numpy()
            type_count += types.sum((0, 1)).cpu().numpy()
        y_np = y.cpu().numpy()
        total_bytes += int(byte_len[y_np].sum())
        for k, row in zip(batch.tolist(), y_np):
            pieces = target_pieces(row, tokenizer)
            contiguous = prev_index is not None and k == prev_index + 1
            total_words += M.count_words(pieces, continues_word=contiguous and prev_in_word)
            prev_index, prev_in_word = k, M.ends_in_word(pieces, contiguous and prev_in_word)
        bar.update(len(batch) * L)
        bar.set_postfix(loss=f"{total_nll / (pos_count[0] * L):.4f}")
        progress.tick(lambda: {"next": b + len(batch), "total_nll": total_nll, "total_bytes": total_bytes,
                               "total_words": total_words, "prev_index": prev_index, "prev_in_word": prev_in_word,
                               "pos_sum": pos_sum.tolist(), "pos_count": pos_count.tolist(),
                               "type_sum": type_sum.tolist(), "type_count": type_count.tolist()})
    bar.close()
    summary = M.loss_summary(total_nll, int(pos_count.sum()), total_bytes, total_words)
    summary["sequences"] = int(len(indices))
    summary["of_sequences"] = int(n)
    summary["position_loss"] = (pos_sum / np.maximum(pos_count, 1)).tolist()
    summary["position_buckets"] = M.bucket_means(pos_sum, pos_count, M.log2_buckets(L))
    summary["token_types"] = {t: {"tokens": int(c), "loss": s / c if c else float("nan")}
                              for t, s, c in zip(type_names, type_sum, type_count)}
    return summary


def token_type_table(tokenizer, dev):
    """(signal table (V, columns) on dev, token type names) from multitrack.narrative, or (None, ())."""
    try:
        from multitrack.narrative import TOKEN_TYPES, build_signal_tables
    except ImportError:
        return None, ()
    return build_signal_tables(tokenizer).to(dev), TOKEN_TYPES


def target_token_types(signal_table, x, y):
    """Narrative token types of the targets y: (B, L, n_types) bool (dialogue, narration, paragraph start, ...).

    Types are computed over x[:, :1] + y (the sequence's first input gives the first target its context);
    the dialogue state before each sequence is unknown and taken as outside dialogue."""
    from multitrack.narrative import narrative_features

    ids = torch.cat([x[:, :1], y], dim=1)                                    # (B, L + 1)
    _, types, _ = narrative_features(signal_table[ids])
    return types[:, 1:]


# ---------------------------------------------------------------------------------------------
# stage: beyond the training length (carried vs reset state over windows of a whole book)


def book_arrays(data, eos: int, cap: int, min_len: int, limit: int) -> list[np.ndarray]:
    """Token arrays of the split's books (trailing eos dropped), each cut to `cap` tokens (0 = whole
    book); books shorter than `min_len` are skipped; at most `limit` books (0 = all), in split order.
    The arrays are uint16 views of the memory-mapped split: nothing is read before a batch needs it."""
    books = []
    for _book_id, start, n in data.book_spans():
        toks = data.tokens[start:start + n]
        if len(toks) and toks[-1] == eos:
            toks = toks[:-1]
        if len(toks) < min_len:
            continue
        books.append(toks[:cap] if cap else toks)
        if limit and len(books) >= limit:
            break
    return books


def eval_books(model, tokenizer, data, dev, win: int, progress: Progress | None = None) -> dict:
    """Loss by window index into each book, state carried across windows vs reset at each window.

    Memory: `book_batch_size` books of at most `book_tokens` tokens (ids and per-token losses) and one
    window of logits at a time. `progress`: per-window sums are saved after each group of books.
    """
    if not hasattr(model, "allocate_cache"):
        raise UserError("model has no allocate_cache(); the carried-state evaluation needs the recurrent cache API")
    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    books = book_arrays(data, eos, book_tokens, win + 1, max_books)
    if not books:
        return {"skipped": f"no book of the {split} split is longer than one window ({win} tokens)"}
    books.sort(key=len, reverse=True)                 # similar lengths share a batch: little padding
    n_win = math.ceil(len(books[0]) / win)
    sums = {"carried": np.zeros(n_win), "reset": np.zeros(n_win)}
    counts, book_counts = np.zeros(n_win), np.zeros(n_win, dtype=np.int64)
    start = 0
    progress = progress or Progress()
    if progress.saved:                              # continue an interrupted run of the same settings
        p = progress.saved
        start, counts, book_counts = p["next"], np.array(p["counts"]), np.array(p["book_counts"], dtype=np.int64)
        sums = {mode: np.array(v) for mode, v in p["sums"].items()}
        print(f"   books: continuing from book {start:,} of {len(books):,} (partial results)")
    bar = tqdm(total=2 * sum(len(b) for b in books), initial=2 * sum(len(b) for b in books[:start]), unit="tok",
               unit_scale=True, desc="books", dynamic_ncols=True)
    for b in range(start, len(books), book_batch_size):
        group = books[b:b + book_batch_size]
        T = len(group[0])
        x = torch.full((len(group), T), eos, dtype=torch.long)
        y = torch.zeros((len(group), T), dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.bool)
        for i, toks in enumerate(group):          # input: eos + book[:-1] (as in the training stream)
            t = torch.from_numpy(np.asarray(toks, dtype=np.int64))
            x[i, 1:len(t)] = t[:-1]
            y[i, :len(t)] = t
            mask[i, :len(t)] = True
        x, y = x.to(dev), y.to(dev)
        maskf = mask.double().numpy()
        for mode in ("carried", "reset"):
            with torch.no_grad(), autocast(dev):
                nll = M.windowed_nll(model, x, y, win, V, carry_state=(mode == "carried"), max_rows=book_batch_size)
            nll64 = nll.double().cpu().numpy() * maskf
            for w in range(math.ceil(T / win)):
                sums[mode][w] += nll64[:, w * win:(w + 1) * win].sum()
            bar.update(int(mask.sum()))
        for w in range(math.ceil(T / win)):
            c = maskf[:, w * win:(w + 1) * win]
            counts[w] += c.sum()
            book_counts[w] += int((c.sum(1) > 0).sum())
        progress.tick(lambda: {"next": b + len(group), "counts": counts.tolist(), "book_counts": book_counts.tolist(),
                               "sums": {mode: v.tolist() for mode, v in sums.items()}})
    bar.close()
    rows = [{"window": w, "first_token": w * win, "books": int(book_counts[w]), "tokens": int(counts[w]),
             "carried": sums["carried"][w] / counts[w], "reset": sums["reset"][w] / counts[w]}
            for w in range(n_win) if counts[w] > 0]
    beyond = counts[1:].sum()
    return {"window_len": win, "books": len(books), "tokens": int(counts.sum()), "rows": rows,
            "carried_loss": sums["carried"].sum() / counts.sum(), "reset_loss": sums["reset"].sum() / counts.sum(),
            "carried_beyond": sums["carried"][1:].sum() / beyond if beyond else float("nan"),
            "reset_beyond": sums["reset"][1:].sum() / beyond if beyond else float("nan")}


# ---------------------------------------------------------------------------------------------
# stage: generation metrics on samples from held-out book openings


def eval_generation(model, tokenizer, data, dev) -> dict:
    """Sample continuations of book openings; degeneration and name-consistency metrics, with the
    books' real continuations scored the same way as a reference."""
    from mamba_lm.generation import generate

    eos = tokenizer.eos_id
    books = book_arrays(data, eos, prompt_tokens + gen_tokens, prompt_tokens + gen_tokens, num_prompts)
    if not books:
        return {"skipped": f"no book of the {split} split has {prompt_tokens + gen_tokens} tokens"}
    gen = torch.Generator(device=dev).manual_seed(seed)
    model_rows, human_rows, samples = [], [], []
    kw = dict(ns=(1, 2, 3, 4), loop_min_period=loop_min_period, loop_repeats=loop_repeats)
    bar = tqdm(total=len(books) * gen_tokens, unit="tok", unit_scale=True, desc="generate", dynamic_ncols=True)
    for b in range(0, len(books), gen_batch_size):
        group = books[b:b + gen_batch_size]
        prompts = torch.tensor(np.stack([np.concatenate([[eos], g[:prompt_tokens]]) for g in group]), device=dev)
        with torch.no_grad(), autocast(dev):
            ids = generate(model, prompts, gen_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty, eos_id=None, generator=gen,
                           vocab_size=tokenizer.vocab_size, cuda_graph=True)
        ids = ids[:, prompts.size(1):].cpu().tolist()
        for g, cont in zip(group, ids):
            if eos in cont:                                   # the model ended the book: score up to there
                cont = cont[:cont.index(eos)]
            prompt_ids = g[:prompt_tokens].tolist()
            prompt_text = tokenizer.decode(prompt_ids)
            text = tokenizer.decode(cont)
            model_rows.append(M.generation_metrics(prompt_ids, cont, prompt_text, text, **kw))
            real = g[prompt_tokens:prompt_tokens + gen_tokens].tolist()
            human_rows.append(M.generation_metrics(prompt_ids, real, prompt_text, tokenizer.decode(real), **kw))
            if len(samples) < 2:
                samples.append({"prompt": prompt_text, "continuation": text})
        bar.update(len(group) * gen_tokens)
    bar.close()
    return {"prompts": len(books), "model": M.mean_metrics(model_rows), "human": M.mean_metrics(human_rows),
            "per_sample": model_rows, "samples": samples}


# ---------------------------------------------------------------------------------------------
# stage: long-range recall probe on procedural demo stories


def recall_books(meta: dict) -> tuple[list[dict], str]:
    """Demo stories for the probe: the held-out split's books when the data is the demo corpus
    (regenerated from meta's source), else `recall_stories` fresh stories (seed `recall_seed`)."""
    from mamba_lm import demo_corpus

    source = meta.get("source") or {}
    if source.get("kind") == "demo":
        held_out = set(meta["splits"][split].get("book_ids", []))
        books = [b for b in demo_corpus.books_for_source(source) if b["id"] in held_out][:recall_stories]
        if books:
            return books, f"{len(books)} demo books of the {split} split"
    books = demo_corpus.generate_books(recall_stories, seed=recall_seed, words_per_book=recall_story_words)
    return books, f"{len(books)} fresh demo stories (seed {recall_seed}, ~{recall_story_words} words each)"


def eval_recall(model, tokenizer, meta: dict, dev, win: int) -> dict:
    """Long-range recall: for each probe of the demo stories, is the answer's first token the argmax
    after the cue, and what is the mean log-prob of the answer tokens? Grouped by the token distance
    between the fact's introduction and the cue; state carried over windows of `win` tokens, and
    (control) reset at every window."""
    from mamba_lm import demo_corpus

    if not hasattr(model, "allocate_cache"):
        raise UserError("model has no allocate_cache(); the recall probe carries the recurrent state over windows")
    books, where = recall_books(meta)
    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    edges = distance_edges(recall_distance_edges)
    per_mode = {"carried": [], "reset": []}
    n_tokens = 0
    for book in tqdm(books, desc="recall", unit="book", dynamic_ncols=True):
        ids, spans = M.probe_token_spans(book["TEXT"], demo_corpus.recall_probes(book), tokenizer)
        n_tokens += len(ids)
        if not spans:
            continue
        y = torch.tensor([ids], device=dev)                              # (1, T)
        x = torch.cat([torch.full((1, 1), eos, device=dev), y[:, :-1]], dim=1)
        for mode in per_mode:
            rows = recall_logprobs(model, x, win, V, [(a, b) for a, b, _, _ in spans], mode == "carried")
            for (a, b, dist, kind), lp in zip(spans, rows):
                per_mode[mode].append({"distance": dist, "kind": kind, **M.answer_scores(lp, y[0, a:b].tolist())})
    if not per_mode["carried"]:
        return {"skipped": "the demo stories produced no recall probe"}
    return {"stories": where, "tokens": n_tokens, **M.summarize_recall(per_mode["carried"], per_mode["reset"], edges)}


def distance_edges(spec: str) -> list[int]:
    """The sorted bucket edges of --recall_distance_edges; UserError unless comma-separated integers."""
    try:
        return sorted(int(e) for e in spec.split(","))
    except ValueError:
        raise UserError(f"--recall_distance_edges={spec!r}: expected comma-separated integers") from None


def recall_logprobs(model, x, win: int, vocab_size: int, spans: list[tuple[int, int]], carry_state: bool) -> list:
    """Log-softmax rows at the answer positions of one book, read in windows of `win` tokens.

    x: (1, T) inputs (eos + book[:-1]); spans: [(a, b)] target index ranges of the answers (row j of
    the logits predicts target j). Returns one (b - a, V) float32 tensor per span.
    """
    wanted = sorted({j for a, b in spans for j in range(a, b)})
    T = x.size(1)
    starts = list(range(0, T, win))
    rows = {}
    cache = model.allocate_cache(1, device=x.device) if carry_state else None
    group = 1 if carry_state else max(1, book_batch_size)        # reset: independent windows share a forward
    xp = torch.nn.functional.pad(x[0], (0, win))                  # (T + win,): room for a short last window
    with torch.no_grad():
        for g in range(0, len(starts), group):
            chunk = starts[g:g + group]
            xs = torch.stack([xp[s:s + win] for s in chunk])             # (n, win)
            with autocast(x.device):
                logits = model(xs, cache=cache) if cache is not None else model(xs)
            for i, s in enumerate(chunk):
                here = [j for j in wanted if s <= j < min(s + win, T)]
                if here:
                    sel = logits[i, [j - s for j in here], :vocab_size].float().log_softmax(-1)   # (n, V)
                    rows.update({j: sel[k] for k, j in enumerate(here)})
    return [torch.stack([rows[j] for j in range(a, b)]) for a, b in spans]


# ---------------------------------------------------------------------------------------------
# report


def fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–" if x is None or math.isnan(x) else str(x)          # "inf" / "-inf"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if abs(x) >= 1e6:
            return f"{x:.3e}"
        return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.{digits}f}"
    return str(x)


def plural(n, word: str) -> str:
    return f"{fmt(n)} {word}" + ("" if n == 1 else "s")


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", sep]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_position_loss(results: dict, path: Path) -> Path | None:
    """Mean loss at each context position (log x), one line per checkpoint."""
    plt = pyplot()
    series = {n: r["loss"]["position_loss"] for n, r in results.items() if "position_loss" in r.get("loss", {})}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    for i, (n, ys) in enumerate(series.items()):
        color = f"C{i % 10}"
        ax.plot(np.arange(1, len(ys) + 1), ys, lw=0.8, alpha=0.35, color=color)       # raw: noisy
        buckets = results[n]["loss"]["position_buckets"]                              # log2-bucket means
        ax.plot([math.sqrt((b["lo"] + 1) * b["hi"]) for b in buckets], [b["loss"] for b in buckets], "o-",
                ms=3, lw=1.5, color=color, label=f"{n} (log2-bucket mean)")
    ax.set_xscale("log")
    ax.set_xlabel("position in the context + 1 (tokens seen before the target)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by position ({split} split; faint: each position, dots: log2-bucket means)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_book_loss(results: dict, path: Path) -> Path | None:
    """Loss by window index into the book, carried (solid) vs reset (dashed), one colour per checkpoint."""
    plt = pyplot()
    series = {n: r["books"]["rows"] for n, r in results.items() if r.get("books", {}).get("rows")}
    if plt is None or not series:
        return None
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (n, rows) in enumerate(series.items()):
        xs = [r["first_token"] for r in rows]
        color = f"C{i % 10}"
        ax.plot(xs, [r["carried"] for r in rows], "o-", ms=3, color=color, label=f"{n} (state carried)")
        ax.plot(xs, [r["reset"] for r in rows], "s--", ms=3, color=color, alpha=0.7, label=f"{n} (state reset)")
        gap.plot(xs[1:], [r["reset"] - r["carried"] for r in rows[1:]], "o-", ms=3, color=color, label=n)
    ax.set_xlabel("distance into the book (tokens, start of window)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(f"loss by window ({split} split)", fontsize=10)
    gap.axhline(0.0, color="0.3", lw=0.8)
    gap.set_xlabel("distance into the book (tokens, start of window)")
    gap.set_ylabel("reset - carried (nats/token)")
    gap.set_title("gain from carrying the state (> 0: the state helps)", fontsize=10)
    for a in (ax, gap):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return save_figure(fig, path)


def with_stage(results: dict, stage: str, key: str) -> list[str]:
    """Names of the checkpoints whose `stage` result holds `key` (skipped stages hold none)."""
    return [n for n, r in results.items() if key in (r.get(stage) or {})]


def section_checkpoints(infos: dict, meta: dict) -> str:
    rows = []
    for n, info in infos.items():
        fp = (info.get("data") or {}).get("fingerprint")
        trained_on = "–" if not fp else "this data" if fp == meta.get("fingerprint") else f"other data (`{fp[:12]}`)"
        rows.append([n, f"`{info.get('path')}`", str(info.get("model_type", "?")), info.get("num_params"),
                     info.get("step"), info.get("tokens_seen"), trained_on])
    return md_table(["name", "path", "type", "params", "step", "tokens seen", "trained on"], rows, "lllrrrl")


def section_data(meta: dict, results: dict, L: int, win: int, device_name: str) -> str:
    sp, tok = meta["splits"].get(split, {}), meta["tokenizer"]
    times = "; ".join(f"{n}: " + ", ".join(f"{st} {r[st].get('seconds', 0):.1f}" for st in r)
                      for n, r in results.items())
    return "\n".join([
        f"- data dir: `{data_dir}`, split **{split}**: {plural(sp.get('books'), 'book')}, {fmt(sp.get('tokens'))} tokens, "
        f"{fmt(sp.get('characters'))} characters",
        f"- fingerprint: `{meta.get('fingerprint')}`",
        f"- tokenizer: {tok.get('name')} ({tok.get('kind')}, vocab {tok.get('vocab_size')}, eos {tok.get('eos_id')}, "
        f"sha256 `{str(tok.get('sha256'))[:16]}`)",
        f"- evaluation context: {L} tokens; window for whole-book evaluation: {win} tokens",
        f"- device: {device_name}, dtype {dtype}; seconds per stage: {times}"])


def section_loss(results: dict) -> str:
    rows = []
    for n in with_stage(results, "loss", "tokens"):
        r = results[n]["loss"]
        rows.append([n, r["tokens"], r["loss"], r["ppl"], r["bits_per_byte"], r["word_ppl"], r["bytes_per_token"],
                     f"{r['sequences']:,} / {r['of_sequences']:,}"])
    return (md_table(["name", "tokens", "loss", "ppl", "bits/byte", "word ppl", "bytes/token", "sequences"], rows)
            + "\n\nloss: mean NLL in nats per token; bits/byte: total NLL in bits / UTF-8 bytes of the target text "
            "(comparable across tokenizers); word ppl: exp(total NLL / whitespace-separated words), the PG-19 "
            "convention. Every sequence starts from the zero state, as in training.")


def section_positions(results: dict, png: Path | None) -> str:
    names_ = with_stage(results, "loss", "position_buckets")
    buckets = results[names_[0]]["loss"]["position_buckets"]
    rows = [[b["label"]] + [results[n]["loss"]["position_buckets"][i]["loss"] for n in names_]
            for i, b in enumerate(buckets)]
    text = (md_table(["positions"] + names_, rows) + "\n\nMean loss of the targets at each position of the "
            "context (the target at position p follows p+1 tokens of context), by log2 buckets.")
    return text + (f"\n\n![loss by position]({png.name})" if png else "")


def section_token_types(results: dict) -> str:
    names_ = [n for n in with_stage(results, "loss", "token_types") if results[n]["loss"]["token_types"]]
    types = list(results[names_[0]]["loss"]["token_types"])
    rows = [[t, results[names_[0]]["loss"]["token_types"][t]["tokens"]]
            + [results[n]["loss"]["token_types"][t]["loss"] for n in names_] for t in types]
    return (md_table(["target token type", "tokens"] + names_, rows)
            + "\n\nMean loss of the targets of each narrative type (multitrack/narrative.py): dialogue = inside "
            "double quotes of the current paragraph, narration = the rest, plus paragraph starts, sentence ends "
            "and heading words; the signals the multi-track router conditions on.")


def book_verdict(bk: dict) -> str:
    delta = bk["reset_beyond"] - bk["carried_beyond"]
    if math.isnan(delta):
        return "no window beyond the first was scored"
    if delta > 0.005:
        return f"carrying the state **helps**: {delta:.4f} nats/token lower than resetting"
    if delta < -0.005:
        return (f"carrying the state **hurts**: {-delta:.4f} nats/token higher than resetting "
                "(the model does not extrapolate past its training length)")
    return f"carrying the state makes **no difference** ({delta:+.4f} nats/token)"


def section_books(results: dict, win: int, png: Path | None) -> str:
    names_ = with_stage(results, "books", "rows")
    header = ["window", "tokens from", "books"] + [f"{n} {mode}" for n in names_ for mode in ("carried", "reset")]
    n_rows = max(len(results[n]["books"]["rows"]) for n in names_)
    # long books (book_tokens=0): windows grouped in log2 buckets (0, 1, 2-3, 4-7, ...), token-weighted
    groups = M.log2_buckets(n_rows) if n_rows > 24 else [(w, w + 1) for w in range(n_rows)]
    rows = []
    for lo, hi in groups:
        cells = [M.bucket_label(lo, hi), None, None] + [None] * (2 * len(names_))
        for j, n in enumerate(names_):
            part = results[n]["books"]["rows"][lo:hi]
            if part:
                tokens = sum(r["tokens"] for r in part)
                cells[1], cells[2] = part[0]["first_token"], part[0]["books"]
                cells[3 + 2 * j] = sum(r["carried"] * r["tokens"] for r in part) / tokens
                cells[4 + 2 * j] = sum(r["reset"] * r["tokens"] for r in part) / tokens
        rows.append(cells)
    lines = [md_table(header, rows), ""]
    for n in names_:
        bk = results[n]["books"]
        lines.append(f"- **{n}**: {plural(bk['books'], 'book')}, {bk['tokens']:,} tokens; beyond the first window, carried "
                     f"{bk['carried_beyond']:.4f} vs reset {bk['reset_beyond']:.4f}: {book_verdict(bk)}.")
    lines.append(f"\nEach book is read from its start in windows of {win} tokens. *carried*: the recurrent state at "
                 "the end of a window is the initial state of the next (one pass over the whole book); *reset*: "
                 "every window starts from the zero state, as in training. Window 0 is the same for both.")
    if png:
        lines.append(f"\n![loss vs distance into the book]({png.name})")
    return "\n".join(lines)


GEN_COLUMNS = [("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("seq_rep_4", "seq-rep-4"),
               ("rep_16", "rep/16"), ("rep_128", "rep/128"), ("first_loop", "tokens before loop"),
               ("looped", "looped"), ("names_consistency", "name consistency"), ("names_new_names", "new names"),
               ("names_prompt_name_recall", "prompt names reused")]


GEN_COUNTS = ("first_loop", "names_new_names")


def section_generation(results: dict) -> str:

    names_ = with_stage(results, "generation", "model")
    def cells(r: dict) -> list:        # counts (means over prompts) with one decimal, rates with four
        return [f"{r[k]:.1f}" if k in GEN_COUNTS and isinstance(r.get(k), float) and math.isfinite(r[k])
                else r.get(k) for k, _ in GEN_COLUMNS]

    rows = [[n] + cells(results[n]["generation"]["model"]) for n in names_]
    rows.append(["real continuation"] + cells(results[names_[0]]["generation"]["human"]))
    text = md_table(["source"] + [h for _, h in GEN_COLUMNS], rows)
    text += (f"\n\nMeans over {plural(results[names_[0]]['generation']['prompts'], 'prompt')}: the first {prompt_tokens} "
             f"tokens of {split} books, {gen_tokens} tokens generated with temperature={temperature}, top_k={top_k}, "
             f"top_p={top_p}, min_p={min_p}, repetition_penalty={repetition_penalty}, seed={seed}. distinct-n: "
             "unique/total n-grams of a sample; seq-rep-4: 1 - unique/total 4-grams (Welleck et al. 2019); rep/l: "
             "share of sampled tokens already among the previous l tokens (prompt included); loop: a block of "
             f">= {loop_min_period} tokens repeated {loop_repeats} times back "
             "to back; name consistency: share of capitalised-name mentions that reuse names of the prompt; "
             "'real continuation' scores the books' own next tokens the same way.")
    for n in names_:
        for s in results[n]["generation"]["samples"][:1]:
            text += (f"\n\n**{n}**, sample 1 (prompt ends: …{s['prompt'][-200:]!r})\n\n"
                     + blockquote(as_paragraphs(s["continuation"][:1200])))
    return text


def section_recall(results: dict, win: int) -> str:
    names_ = with_stage(results, "recall", "buckets")
    labels = []
    for n in names_:
        labels += [lab for lab in results[n]["recall"]["buckets"] if lab not in labels]
    header = ["distance (tokens)", "probes"] + [h for n in names_
                                                for h in (f"{n} acc", f"{n} acc (reset)", f"{n} logprob")]
    rows = []
    for lab in labels + ["all"]:
        row = [lab, None]
        for n in names_:
            rec = results[n]["recall"]
            bk = rec if lab == "all" else rec["buckets"].get(lab, {})
            row[1] = row[1] or bk.get("probes")
            row += [bk.get("accuracy"), bk.get("reset_accuracy"), bk.get("mean_logprob")]
        rows.append(row)
    kinds = md_table(["kind"] + names_, [[k] + [results[n]["recall"]["by_kind"].get(k) for n in names_]
                                         for k in results[names_[0]]["recall"]["by_kind"]])
    return (md_table(header, rows)
            + f"\n\nProbes on {results[names_[0]]['recall']['stories']}. acc: share of probes whose answer's first "
            "token is the model's argmax right after the cue (e.g. \"..., the blacksmith from\" -> \" Eldham\"); "
            "logprob: mean log-probability of the answer tokens (teacher-forced); distance: tokens between the "
            f"fact's introduction and the cue. The story is read in windows of {win} tokens with the state carried "
            "over; *reset* is the control that zeroes the state at every window, so facts from earlier windows "
            "are out of reach.\n\nAccuracy by kind of fact:\n\n" + kinds)


def report_sections(results: dict, infos: dict, meta: dict, win: int, L: int, pngs: dict, notes: list[str],
                    device_name: str) -> list[tuple[str, str]]:
    """[(heading, markdown)] of the report; a section appears when at least one checkpoint has its stage."""
    sections = [("Checkpoints", section_checkpoints(infos, meta)),
                ("Data", section_data(meta, results, L, win, device_name))]
    if with_stage(results, "loss", "tokens"):
        sections.append(("Token loss", section_loss(results)))
        sections.append(("Loss by position in the context", section_positions(results, pngs.get("positions"))))
        if any(results[n]["loss"].get("token_types") for n in with_stage(results, "loss", "token_types")):
            sections.append(("Loss by token type", section_token_types(results)))
    if with_stage(results, "books", "rows"):
        sections.append(("Beyond the training length", section_books(results, win, pngs.get("books"))))
    if with_stage(results, "generation", "model"):
        sections.append(("Generation", section_generation(results)))
    if with_stage(results, "recall", "buckets"):
        sections.append(("Long-range recall", section_recall(results, win)))
    if notes:
        sections.append(("Notes", "\n".join(f"- {x}" for x in notes)))
    sections.append(("Settings", "```json\n" + json.dumps(config, indent=1) + "\n```"))
    return sections


# ---------------------------------------------------------------------------------------------
# main


def main() -> None:
    from mamba_lm.data import TokenSplit, load_meta
    from mamba_lm.trainer import resolve_device

    chosen = parse_stages(stages)
    dev = resolve_device(device)
    autocast(dev)                                   # bad --dtype / --recall_distance_edges: an error now,
    if "recall" in chosen:                          # not a stage skipped for every checkpoint
        distance_edges(recall_distance_edges)
    pairs = checkpoint_list(ckpts, names)
    meta = load_meta(data_dir)
    if split not in meta.get("splits", {}):
        raise UserError(f"--split={split!r} not in {data_dir} (has {', '.join(meta.get('splits', {}))})")
    data = TokenSplit(data_dir, split, seq_len=seq_len or None)
    L = data.seq_len
    win = window or L
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
        st_path = state_path(file_identity(path), meta.get("fingerprint", ""))
        state = load_state(st_path)
        state.update({"checkpoint": path, "data_dir": data_dir, "fingerprint": meta.get("fingerprint"), "split": split})
        results[name] = {}
        for stage in chosen:
            key = stage_settings(stage, L, win)
            cached = state["stages"].get(stage)
            if cached and cached.get("settings") == key:
                print(f"   {stage}: reusing finished results from {st_path}")
                results[name][stage] = cached["result"]
                continue
            t0 = time.time()
            partial = state.setdefault("partial", {})
            saved = partial.get(stage) if (partial.get(stage) or {}).get("settings") == key else None

            def save_partial(acc, stage=stage, key=key):              # survives a crash inside the stage
                partial[stage] = {"settings": key, "progress": acc}
                save_state(st_path, state)

            progress = Progress(saved["progress"] if saved else None, save_partial)
            try:
                if stage == "loss":
                    res = eval_loss(model, tokenizer, data, dev, progress)
                elif stage == "books":
                    res = eval_books(model, tokenizer, data, dev, win, progress)
                elif stage == "generation":
                    res = eval_generation(model, tokenizer, data, dev)
                else:
                    res = eval_recall(model, tokenizer, meta, dev, win)
            except (UserError, ImportError) as e:
                notes.append(f"{name}: stage {stage} skipped: {e}")
                print(f"   {stage}: skipped ({e})")
                continue
            res["seconds"] = round(time.time() - t0, 2)
            if res.get("skipped"):
                notes.append(f"{name}: stage {stage} skipped: {res['skipped']}")
            results[name][stage] = res
            state["stages"][stage] = {"settings": key, "result": res}
            partial.pop(stage, None)
            save_state(st_path, state)                          # partial results survive a crash
            print(f"   {stage}: done in {res['seconds']:.1f}s" + _headline(stage, res))
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    pngs = {"positions": plot_position_loss(results, out_md.with_name(out_md.stem + "_positions.png")),
            "books": plot_book_loss(results, out_md.with_name(out_md.stem + "_books.png"))}
    infos_json = {n: {k: v for k, v in i.items() if k not in ("train_config", "model_config", "source_config")}
                  for n, i in infos.items()}
    out_json = out_md.with_suffix(".json")
    save_state(out_json, {"config": config, "checkpoints": infos_json, "results": results,
                          "data": {"dir": data_dir, "split": split, "fingerprint": meta.get("fingerprint")}})
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    sections = report_sections(results, infos, meta, win, L, pngs, notes, device_name)
    write_markdown(out_md, f"Evaluation: {', '.join(n for n, _ in pairs)}", sections, append=False)
    print(f"wrote {out_md}" + "".join(f", {p}" for p in pngs.values() if p) + f", {out_json}")


def _headline(stage: str, res: dict) -> str:
    if stage == "loss" and "loss" in res:
        return (f" | loss {res['loss']:.4f} ppl {res['ppl']:.2f} bpb {res['bits_per_byte']:.4f} "
                f"word-ppl {res['word_ppl']:.2f}")
    if stage == "books" and "carried_beyond" in res:
        return f" | beyond window 0: carried {res['carried_beyond']:.4f} reset {res['reset_beyond']:.4f}"
    if stage == "generation" and "model" in res:
        return f" | seq-rep-4 {res['model']['seq_rep_4']:.3f} distinct-2 {res['model']['distinct_2']:.3f}"
    if stage == "recall" and "accuracy" in res:
        return f" | accuracy {res['accuracy']:.3f}"
    return ""


if __name__ == "__main__":
    with user_errors():
        main()
