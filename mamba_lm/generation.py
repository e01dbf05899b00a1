"""Sampling and recurrent (constant-memory) generation.

A Mamba LM is an RNN at inference time: the prompt is processed by one parallel
`model.forward(prompt, cache=cache)` that leaves the final state (conv_state (B, E·D, d_conv),
ssm_state (B, E·D, N) per layer) in `cache`, then each new token costs one `model.step(ids, cache)`,
O(1) in time and memory however long the story gets. The output ids go into one buffer allocated
up front, and the repetition penalty uses a (B, V) "seen" mask instead of the growing history,
so a 10,000-token story allocates nothing per token.

On CUDA the decode step runs as a CUDA graph (mamba-ssm `utils/generation.py` does the same):
model.step is captured once on static input/cache buffers and replayed per token, removing the
kernel-launch overhead that dominates small-batch decoding. On the CPU, `compile=True` runs the step
through torch.compile (inductor's C++ code: the element-wise work of each layer fused, the matrix
products left to ATen), which removes most of the per-op dispatch that bounds small models there
(measured 2.3-2.5x the eager step at small-cpu, 1.1x at 130M where reading the weights dominates),
after a compile of about 10-30 s per model shape and batch size (cached on disk for later runs): worth it
for long generations. Any failure of either falls back to eager steps with a warning.

Sampling order (as in HF transformers): repetition penalty -> temperature -> top-k -> top-p ->
min-p -> a categorical draw (`sample_categorical`). temperature == 0 is greedy. Logits beyond
`vocab_size` (the padding of the embedding to a multiple of 8) are never sampled.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch

from mamba_lm.errors import UserError

NEG_INF = float("-inf")


class NonFiniteLogits(UserError):
    """The model produced NaN / +inf logits (or a row with no finite logit): nothing is sampled from them."""


def check_logits(logits, where: str) -> None:
    """Raise NonFiniteLogits unless every row of `logits` (B, V) is usable: no NaN, no +inf, and at least one
    finite value (a -inf logit alone is a masked token). One host sync, like the eos check of `generate`."""
    bad = torch.isnan(logits).any() | torch.isposinf(logits).any() | torch.isneginf(logits).all(-1).any()
    if bool(bad):
        raise NonFiniteLogits(f"the model produced non-finite logits (NaN or inf) {where}; nothing was sampled")


# ----------------------------------------------------------------------------------------------
# logits filters; logits: (B, V) float

def apply_repetition_penalty(logits, seen, penalty: float):
    """CTRL penalty (Keskar et al. 2019): logits of already-seen tokens /penalty if > 0, *penalty if < 0.

    logits: (B, V); seen: (B, V) bool, True where the token occurs in prompt or output.
    """
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits, k: int):
    """Keep the k largest logits per row, -inf elsewhere (k <= 0 or k >= V: no-op)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]            # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


_TOP_P_CANDIDATES = (256, 2048)   # top_p_filter looks for the nucleus among this many best tokens first


def top_p_filter(logits, p: float):
    """Nucleus (Holtzman et al. 2020): keep the smallest set of top tokens whose probability reaches p.

    The nucleus is looked for among the k best tokens first (torch.topk, k in `_TOP_P_CANDIDATES`),
    with their probabilities under the full softmax, and the whole row is sorted only when those k do not
    reach p in some row: a sort of a 50k vocabulary costs 3.5 ms per token on the CPU, more than a
    small model's decode step, topk of 256 about 0.13 ms. Same kept set as sorting everything (tested).
    """
    if p >= 1.0:
        return logits
    vocab = logits.size(-1)
    full_probs = logits.softmax(-1)                                   # (B, V)
    for k in [k for k in _TOP_P_CANDIDATES if k < vocab] + [vocab]:
        if k < vocab:
            order = torch.topk(logits, k, dim=-1).indices              # best first
        else:
            order = torch.sort(logits, dim=-1, descending=True).indices
        probs = full_probs.gather(-1, order)
        mass = probs.cumsum(-1)
        if k == vocab or bool((mass[..., -1] >= p).all()):
            break
    drop_sorted = (mass - probs) >= p                                 # mass of strictly better tokens
    drop_sorted[..., 0] = False                                      # always keep the best token
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
    return logits.masked_fill(~keep, NEG_INF)


def min_p_filter(logits, min_p: float):
    """Min-p (Nguyen et al. 2024): drop tokens whose probability is below min_p * max probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def sample_from_logits(logits, seen=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                       repetition_penalty=1.0, generator=None):
    """One token per row from logits (B, V) already cut to the vocabulary; `seen`: (B, V) bool or None."""
    logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    logits = min_p_filter(logits, min_p)
    return sample_categorical(logits.softmax(-1), generator)


def sample_categorical(probs, generator=None):
    """One index per row of probs (B, V) (rows summing to 1; zeros allowed), drawn by inverting the CDF:
    the first index whose cumulative probability exceeds u ~ U[0, total). The law of torch.multinomial
    (tested), for one uniform draw per row instead of the V exponentials torch.multinomial draws (at V = 50k
    on the CPU: 60 µs vs 1 ms per token, a sixth of small-cpu's decode). A zero-probability index is never
    drawn: its cumulative sum equals its predecessor's, and u < total. Cumulated in float64."""
    cdf = probs.double().cumsum(-1)                                  # (B, V)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))   # u < total despite rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def seen_mask(ids, vocab_size: int):
    """(B, T) ids -> (B, V) bool mask of the tokens that occur (for the repetition penalty)."""
    width = max(vocab_size, int(ids.max()) + 1) if ids.numel() else vocab_size
    mask = torch.zeros(ids.size(0), width, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)[:, :vocab_size]


def sample_next(logits, generated=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                repetition_penalty=1.0, generator=None, vocab_size=None):
    """Sample the next ids (B,) from logits (B, V_padded).

    generated: (B, T) ids seen so far (prompt + output) for the repetition penalty, or None.
    vocab_size: logits[..., vocab_size:] (embedding padding) are cut off before sampling.
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    seen = None
    if generated is not None and repetition_penalty != 1.0:
        seen = seen_mask(generated, logits.size(-1))
    return sample_from_logits(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty, generator)


def check_sampling_options(*, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                           max_new_tokens=1, num_samples=1) -> None:
    """Raise UserError (one line, says the valid range) for settings that would crash or silently
    misbehave in the sampler (e.g. min_p > 1 or repetition_penalty <= 0 leave no finite probability)."""
    checks = [
        (temperature >= 0, f"--temperature={temperature} must be >= 0 (0 = greedy)"),
        (top_k >= 0, f"--top_k={top_k} must be >= 0 (0 = off)"),
        (0 < top_p <= 1, f"--top_p={top_p} must be in (0, 1] (1 = off)"),
        (0 <= min_p <= 1, f"--min_p={min_p} must be in [0, 1] (0 = off)"),
        (repetition_penalty > 0, f"--repetition_penalty={repetition_penalty} must be > 0 (1 = off)"),
        (max_new_tokens >= 0, f"--max_new_tokens={max_new_tokens} must be >= 0"),
        (num_samples >= 1, f"--num_samples={num_samples} must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


# ----------------------------------------------------------------------------------------------
# recurrent generation

def cache_tensors(cache) -> list[torch.Tensor]:
    """All tensors held by an (opaque) cache object, found by walking its attributes/containers."""
    found, stack, visited = [], [cache], set()
    while stack:
        obj = stack.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return found


class CompiledStep:
    """model.step through torch.compile (inductor, static shapes, one graph: `fullgraph=True`), bound to
    `cache`. If compiling fails (no C++ compiler, an op inductor cannot take) the first call warns and
    this object runs the eager model.step from then on; nothing has run on the cache by then (dynamo and
    inductor fail before the compiled code executes)."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        self.compiled = torch.compile(model.step, dynamic=False, fullgraph=True)
        self.checked = False

    def __call__(self, ids):
        if self.checked:
            return self.compiled(ids, self.cache)
        try:
            logits = self.compiled(ids, self.cache)
        except Exception as e:  # noqa: BLE001 - any compile failure: decode eagerly, and say so
            warnings.warn(f"torch.compile of model.step failed ({type(e).__name__}: {str(e)[:200]}); decoding eagerly")
            self.compiled = self.model.step
            logits = self.compiled(ids, self.cache)
        self.checked = True
        return logits


class CUDAGraphStep:
    """model.step captured as a CUDA graph on static buffers (input ids (B,), the cache, logits).

    The cache must be updated in place by forward/step (the graph replays on fixed addresses);
    `__call__(ids)` copies ids into the static buffer, replays, and returns the static logits
    (valid until the next call).
    """

    def __init__(self, model, cache, batch_size: int, device, warmup: int = 2):
        self.cache = cache
        self.ptrs = [t.data_ptr() for t in cache_tensors(cache)]
        self.static_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                model.step(self.static_ids, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_logits = model.step(self.static_ids, cache)
        cache.reset()

    def addresses_unchanged(self) -> bool:
        return [t.data_ptr() for t in cache_tensors(self.cache)] == self.ptrs

    def __call__(self, ids):
        self.static_ids.copy_(ids)
        self.graph.replay()
        return self.static_logits


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens: int, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, eos_id=None, generator=None,
             on_token: Callable[[int, torch.Tensor], None] | None = None, cuda_graph=True,
             vocab_size: int | None = None, compile: bool = False):
    """Continue `prompt_ids` (B, L0) by `max_new_tokens` tokens -> (B, L0 + T) ids.

    The prompt goes through one parallel forward that fills the cache, then one `model.step`
    per token (constant memory). Rows that emitted `eos_id` keep emitting it; generation stops
    early once every row has. `on_token(t, ids)` is called with each new column ids (B,) (for
    streaming). `vocab_size` defaults to `model.config.vocab_size`; padded logits are never sampled.
    `compile`: run the step through torch.compile where no CUDA graph runs it (`CompiledStep`; the
    module docstring says when it pays).
    """
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                           num_samples=max(1, prompt_ids.size(0)))
    model.eval()
    device = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    if prompt_len == 0:
        raise ValueError("generate needs at least one prompt token (use the tokenizer's eos_id for an empty prompt)")
    vocab = vocab_size or getattr(getattr(model, "config", None), "vocab_size", None)
    out = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    out[:, :prompt_len] = prompt_ids
    if max_new_tokens == 0:
        return out
    cache = model.allocate_cache(batch, device=device)
    step = _make_step(model, cache, batch, device, cuda_graph, compile)
    logits = model(prompt_ids, cache=cache)[:, -1]                    # (B, V_padded)
    check_logits(logits[:, :vocab or logits.size(-1)], "for the prompt")
    if isinstance(step, CUDAGraphStep) and not step.addresses_unchanged():
        warnings.warn("model.forward replaced the cache tensors instead of updating them in place; "
                      "CUDA graph decoding disabled")
        step = model.step
    vocab = vocab or logits.size(-1)
    seen = seen_mask(prompt_ids, vocab) if repetition_penalty != 1.0 else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    end = prompt_len + max_new_tokens
    for t in range(max_new_tokens):
        ids = sample_from_logits(logits[:, :vocab], seen, temperature, top_k, top_p, min_p,
                                 repetition_penalty, generator)        # (B,)
        if eos_id is not None:
            ids = torch.where(finished, torch.full_like(ids, eos_id), ids)
            finished |= ids == eos_id
        out[:, prompt_len + t] = ids
        if seen is not None:
            seen.scatter_(1, ids[:, None], True)
        if on_token is not None:
            on_token(t, ids)
        if eos_id is not None and bool(finished.all()):
            end = prompt_len + t + 1
            break
        if t + 1 < max_new_tokens:
            logits = step(ids)
            check_logits(logits[:, :vocab], f"at generated token {t + 2}")
    return out[:, :end]


def _make_step(model, cache, batch, device, cuda_graph: bool, compile: bool = False):
    """model.step bound to the cache: as a CUDA graph when asked for and possible, else compiled when asked."""
    if cuda_graph and device.type == "cuda":
        try:
            return CUDAGraphStep(model, cache, batch, device)
        except Exception as e:  # capture needs static shapes and no host syncs inside step
            warnings.warn(f"CUDA graph capture of model.step failed ({type(e).__name__}: {e}); decoding eagerly")
            cache.reset()
    if compile:
        return CompiledStep(model, cache)
    return lambda ids: model.step(ids, cache)


class TextStreamer:
    """Print tokens as they arrive: buffer ids until they decode to whole characters (no '\\ufffd')."""

    def __init__(self, tokenizer, file=None, row: int = 0):
        self.tokenizer, self.file, self.row, self.pending = tokenizer, file or sys.stdout, row, []

    def __call__(self, t: int, ids) -> None:
        self.pending.append(int(ids[self.row]))
        text = self.tokenizer.decode(self.pending)
        if not text.endswith("\ufffd") or len(self.pending) > 8:
            self.file.write(text)
            self.file.flush()
            self.pending = []

    def end(self) -> None:
        if self.pending:
            self.file.write(self.tokenizer.decode(self.pending))
            self.pending = []
        self.file.write("\n")
        self.file.flush()


def read_prompts(prompt: str, prompt_file: str = "") -> list[str]:
    """The prompt plus those of `prompt_file` (separated by lines containing only `---`).

    Prompt-file entries are stripped of surrounding blank lines; `\\n` in `prompt` becomes a newline.
    A prompt file that holds no prompt is an error (a wrong or empty file, not "generate nothing").
    """
    prompts = [prompt.replace("\\n", "\n")] if prompt or not prompt_file else []
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UserError(f"cannot read --prompt_file={prompt_file} ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"cannot read --prompt_file={prompt_file} (not UTF-8 text: {e.reason} at byte {e.start}); "
                            "save it as UTF-8") from None
        entries, current = [], []
        for line in text.splitlines():
            if line.strip() == "---":
                entries.append("\n".join(current))
                current = []
            else:
                current.append(line)
        entries.append("\n".join(current))
        from_file = [e.strip("\n") for e in entries if e.strip()]
        if not from_file:
            raise UserError(f"--prompt_file={prompt_file} holds no prompt (it is empty or only blank lines and "
                            "---); write prompts separated by lines containing only ---")
        prompts += from_file
    return prompts
