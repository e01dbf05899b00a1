"""Sampling filters, recurrent generation (step == forward, constant memory), generate_text.py CLI."""

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_lm.generation import (apply_repetition_penalty, cache_tensors, generate, min_p_filter, read_prompts,
                                   sample_next, seen_mask, top_k_filter, top_p_filter)

ROOT = Path(__file__).resolve().parents[1]
PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_k_best():
    """top-k leaves exactly the k largest logits finite."""
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 0)) == set(range(5))


@pytest.mark.parametrize("p, expected", [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_smallest_set_reaching_p(p, expected):
    """Nucleus keeps the smallest prefix of sorted tokens whose mass reaches p (order-independent)."""
    logits = PROBS.log()
    assert kept(top_p_filter(logits, p)) == expected
    perm = torch.tensor([2, 0, 3, 1])  # shuffled vocabulary positions
    assert kept(top_p_filter(logits[:, perm], p)) == {int((perm == i).nonzero()) for i in expected}


def test_min_p_relative_threshold():
    """min-p drops tokens whose probability is below min_p * max probability."""
    logits = PROBS.log()
    assert kept(min_p_filter(logits, 0.35)) == {0, 1}        # threshold 0.175
    assert kept(min_p_filter(logits, 0.05)) == {0, 1, 2, 3}  # threshold 0.025


def test_repetition_penalty_ctrl():
    """CTRL penalty divides positive and multiplies negative logits of seen tokens only."""
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = seen_mask(torch.tensor([[0, 1, 1]]), 4)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 2.0, -2.0]]))


def test_greedy_and_padding_never_sampled():
    """temperature 0 is argmax over the real vocab; huge padded logits beyond vocab_size are never chosen."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 100.0, 100.0]])  # ids 3, 4 are padding
    assert sample_next(logits, temperature=0, vocab_size=3).item() == 1
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits.expand(500, -1), temperature=5.0, vocab_size=3, generator=g)
    assert int(ids.max()) < 3 and len(set(ids.tolist())) == 3


@pytest.mark.parametrize("scale,p", [(6.0, 0.9), (1.0, 0.5), (0.3, 0.95), (0.05, 0.99)])
def test_top_p_from_candidates_equals_sorting_everything(scale, p):
    """top_p_filter's search among the best 256 / 2048 tokens (then the whole row) keeps exactly the tokens a
    full sort keeps (the reference below), for nuclei of a few tokens up to most of a 5,000-token row,
    with -inf logits (an earlier top-k) present."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5000, generator=g) * scale
    logits[0, ::3] = float("-inf")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop_sorted[..., 0] = False
    reference = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    out = top_p_filter(logits, p)
    assert torch.equal(out.isinf(), reference.isinf())
    assert torch.equal(out, reference)


def test_categorical_draw_follows_the_probabilities():
    """generation.sample_categorical (the sampler of every temperature > 0 draw): frequencies over 40,000 rows
    match the probabilities (as torch.multinomial's would, within 4 standard errors), zero-probability ids,
    first and last included, are never drawn, and a one-hot row always gives its id."""
    from mamba_lm.generation import sample_categorical
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]]).expand(40_000, -1)
    ids = sample_categorical(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6).double() / ids.numel()
    sigma = (probs[0].double() * (1 - probs[0].double()) / ids.numel()).sqrt()
    assert (freq - probs[0]).abs().le(4 * sigma + 1e-12).all(), freq
    assert freq[[0, 2, 5]].sum() == 0
    one_hot = torch.zeros(3, 50_000)
    one_hot[torch.arange(3), torch.tensor([0, 777, 49_999])] = 1.0
    assert sample_categorical(one_hot).tolist() == [0, 777, 49_999]


def test_sampling_respects_filters_and_penalty():
    """Samples only come from the top-k set; a strong repetition penalty moves greedy off a seen token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]]).expand(400, -1)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {1, 2}
    one = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert sample_next(one, generated=torch.tensor([[1]]), temperature=0, repetition_penalty=2.0).item() == 2


def naive_greedy(model, prompt, n):
    """Reference: re-run the full parallel forward on the growing sequence (no cache)."""
    ids = prompt
    for _ in range(n):
        logits = model(ids)[:, -1, :model.config.vocab_size]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_matches_full_forward(tiny_model):
    """Greedy generation with prompt forward + cache + step() equals recomputing forward each token."""
    model = tiny_model(vocab_size=61).eval()
    prompt = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = naive_greedy(model, prompt, 12)
    out = generate(model, prompt, 12, temperature=0.0)
    assert out.shape == (2, 19)
    assert torch.equal(out, expected)


def test_generate_constant_memory(tiny_model):
    """2,000 decode steps allocate nothing per token: same cache tensors and same live-tensor count."""
    model = tiny_model(vocab_size=61, d_model=32, n_layer=1).eval()
    caches, counts = [], {}
    allocate = model.allocate_cache

    def spy_allocate(*args, **kwargs):
        cache = allocate(*args, **kwargs)
        caches.append((cache, [(t.data_ptr(), tuple(t.shape)) for t in cache_tensors(cache)]))
        return cache

    def on_token(t, ids):
        if t in (100, 1999):
            gc.collect()
            counts[t] = sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    model.allocate_cache = spy_allocate
    out = generate(model, torch.zeros(1, 5, dtype=torch.long), 2000, temperature=1.0, repetition_penalty=1.2,
                   generator=torch.Generator().manual_seed(0), on_token=on_token)
    assert out.shape == (1, 2005)
    assert len(caches) == 1
    cache, layout = caches[0]
    assert [(t.data_ptr(), tuple(t.shape)) for t in cache_tensors(cache)] == layout
    assert counts[100] == counts[1999], counts


def test_generate_stops_at_eos(tiny_model):
    """Rows that emit eos keep emitting it; generation ends once every row has."""
    model = tiny_model(vocab_size=61).eval()
    with torch.no_grad():
        first = model(torch.tensor([[3, 4]]))[0, -1, :61].argmax().item()
    out = generate(model, torch.tensor([[3, 4]]), 50, temperature=0.0, eos_id=first)
    assert out.tolist() == [[3, 4, first]]


def test_read_prompts(tmp_path):
    """--prompt plus a prompt file whose entries are separated by lines of ---."""
    f = tmp_path / "p.txt"
    f.write_text("First one\nspans lines\n---\n\nSecond\n---\n")
    assert read_prompts("Hello", str(f)) == ["Hello", "First one\nspans lines", "Second"]
    assert read_prompts("", str(f)) == ["First one\nspans lines", "Second"]
    assert read_prompts("", "") == [""]


def test_read_prompts_bad_file_is_user_error(tmp_path):
    """A missing or non-UTF-8 --prompt_file gives a one-line UserError, not a traceback."""
    from mamba_lm.errors import UserError
    with pytest.raises(UserError, match="cannot read --prompt_file=.*missing.txt"):
        read_prompts("", str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text.*save it as UTF-8"):
        read_prompts("", str(bad))


def test_generate_text_cli(tmp_path, tiny_model, demo_data_dir):
    """generate_text.py rebuilds the model from a checkpoint alone, writes markdown, and appends on a second run."""
    from mamba_lm.checkpoint import save_checkpoint
    from mamba_lm.models import model_config_dict
    from mamba_lm.tokenizer import load_tokenizer

    model = tiny_model()
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, {"model_type": "mamba", "model_config": model_config_dict(model), "model": model.state_dict(),
                           "optimizer": None, "train_config": {}, "tokenizer": load_tokenizer("byte").to_dict(),
                           "data": {"dir": str(demo_data_dir), "fingerprint": "x", "seq_len": 32}, "step": 7,
                           "tokens_seen": 896, "metrics": {"val_loss": 5.0, "val_ppl": 148.4}})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Second prompt\n---\nThird prompt\n")
    gen_dir = tmp_path / "gen"
    args = [sys.executable, "generate_text.py", f"--ckpt={ckpt}", "--prompt=Once upon", f"--prompt_file={prompts}",
            "--max_new_tokens=20", "--num_samples=2", f"--generations_dir={gen_dir}", "--device=cpu"]
    for _ in range(2):
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    files = list(gen_dir.glob("generations_*.md"))
    assert len(files) == 1
    text = files[0].read_text()
    assert text.count("# Generated samples") == 1 and text.count("\n## ") == 2  # appended, not clobbered
    assert "### Prompt 3" in text and "**Sample 2**" in text and "step 7" in text
    assert '"max_new_tokens": 20' in text and "28,384 params" in text
    assert "Once upon" in r.stdout  # the first sample streamed to stdout


def test_generate_text_bad_input(tmp_path):
    """A missing checkpoint, an unknown key or an out-of-range sampling setting (which would otherwise
    crash torch.multinomial with a traceback, or sample nothing): one-line error, exit status 2."""
    for arg in (f"--ckpt={tmp_path / 'nope.pt'}", "--temprature=0.5", "--min_p=2.0", "--repetition_penalty=0.0",
                "--num_samples=0", "--top_p=0.0", "--temperature=-1.0", "--max_new_tokens=-5"):
        r = subprocess.run([sys.executable, "generate_text.py", arg], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2
        assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
        assert arg.split("=")[0].lstrip("-") in r.stderr, r.stderr   # the message names the setting


def test_check_sampling_options_accepts_the_edges():
    """The validator accepts every boundary value the sampler handles (greedy, off switches, min_p=1)."""
    from mamba_lm.errors import UserError
    from mamba_lm.generation import check_sampling_options

    check_sampling_options(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=1.0,
                           max_new_tokens=0, num_samples=1)
    with pytest.raises(UserError, match="min_p"):
        check_sampling_options(min_p=1.5)


# ---- broken results are never called good -------------------------------------------------------------------
class ConstantLogits(torch.nn.Module):
    """A stand-in model whose logits are `value` at token `bad_at` of generation (0: the prompt forward)."""

    def __init__(self, value, bad_at=0, vocab=11):
        super().__init__()
        self.value, self.bad_at, self.vocab, self.calls = value, bad_at, vocab, 0

    def allocate_cache(self, batch, device=None):
        return object()

    def _logits(self, batch):
        logits = torch.zeros(batch, self.vocab)
        if self.calls == self.bad_at:
            logits[0, 3] = self.value
        self.calls += 1
        return logits

    def forward(self, ids, cache=None):
        return self._logits(ids.size(0))[:, None].expand(-1, ids.size(1), -1)

    def step(self, ids, cache):
        return self._logits(ids.size(0))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad_at", [0, 3])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_refused_not_sampled(value, bad_at, temperature):
    """NaN or +inf logits (from the prompt forward or a later step, greedy or sampled) raise
    NonFiniteLogits saying where, instead of a crash inside torch.multinomial or a silent argmax."""
    from mamba_lm.generation import NonFiniteLogits
    where = "for the prompt" if bad_at == 0 else f"at generated token {bad_at + 1}"
    with pytest.raises(NonFiniteLogits, match=f"non-finite logits .*{where}"):
        generate(ConstantLogits(value, bad_at), torch.tensor([[1, 2], [1, 2]]), 8, temperature=temperature,
                 vocab_size=11)


def test_masked_neg_inf_logits_are_fine():
    """A -inf logit is a masked token, not a broken model: generation goes on and never samples it."""
    out = generate(ConstantLogits(float("-inf"), bad_at=0), torch.tensor([[1]]), 4, temperature=1.0,
                   generator=torch.Generator().manual_seed(0), vocab_size=11)
    assert out.shape == (1, 5) and out[0, 1].item() != 3


def test_prompt_file_without_prompts_is_an_error(tmp_path):
    """An empty prompt file, or one of blank lines and --- only, is a UserError (not a run that samples
    nothing, nor one that silently falls back to --prompt)."""
    from mamba_lm.errors import UserError
    for text in ("", "\n\n", "---\n\n---\n"):
        (tmp_path / "p.txt").write_text(text)
        with pytest.raises(UserError, match="holds no prompt"):
            read_prompts("Hello", str(tmp_path / "p.txt"))


def _checkpoint(tmp_path, tiny_model, scale=None, nan=False):
    from mamba_lm.checkpoint import save_checkpoint
    from mamba_lm.models import model_config_dict
    from mamba_lm.tokenizer import load_tokenizer

    model = tiny_model()
    state = model.state_dict()
    if scale is not None:  # finite weights whose logits overflow float32: ~scale * scale**0.5 * 0.02
        state = {k: v * scale if k.endswith("norm_f.weight") else v * scale ** 0.5
                 if k.endswith(("embedding.weight", "lm_head.weight")) else v for k, v in state.items()}
    if nan:
        first = next(k for k in state if k.endswith("mixer.out_proj.weight"))  # not the tied embedding
        state[first] = state[first].clone().fill_(float("nan"))
    path = tmp_path / f"ckpt-{scale}-{nan}.pt"
    save_checkpoint(path, {"model_type": "mamba", "model_config": model_config_dict(model), "model": state,
                           "optimizer": None, "train_config": {}, "tokenizer": load_tokenizer("byte").to_dict(),
                           "data": {}, "step": 3, "tokens_seen": 96, "metrics": {}})
    return path


def _generate_text(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "generate_text.py"), "--device=cpu", "--max_new_tokens=4",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generate_text_refuses_broken_checkpoints_naming_them(tmp_path, tiny_model):
    """NaN weights, and finite weights whose logits overflow to inf/NaN: exit 2, one line naming the
    checkpoint, nothing written to the generations folder."""
    gen = tmp_path / "gen"
    for ckpt, message in ((_checkpoint(tmp_path, tiny_model, nan=True), "holds non-finite weights"),
                          (_checkpoint(tmp_path, tiny_model, scale=1e30), "non-finite logits")):
        r = _generate_text(f"--ckpt={ckpt}", f"--generations_dir={gen}", "--stream=False")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert lines[-1].startswith("error: ") and str(ckpt) in lines[-1] and message in lines[-1], r.stderr
        assert not gen.exists()


def test_generate_text_fails_before_sampling_when_it_cannot_write(tmp_path, tiny_model):
    """A generations folder that cannot be written (below a file; read-only when not root) or a read-only
    day file: exit 2 with one line before the model is loaded or sampled, the day file unchanged."""
    ckpt = _checkpoint(tmp_path, tiny_model)
    (tmp_path / "a_file").write_text("x")
    cases = [(f"--generations_dir={tmp_path / 'a_file' / 'gen'}", "is a file")]
    if os.geteuid() != 0:  # root writes anywhere: permissions cannot be tested as root
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases.append((f"--generations_dir={ro / 'gen'}", "permission denied"))
        day = tmp_path / "day"
        day.mkdir()
        import datetime
        stamp = datetime.datetime.now(datetime.timezone.utc)
        (day / f"generations_{stamp:%Y%m%d}.md").write_text("# old\n")
        (day / f"generations_{stamp:%Y%m%d}.md").chmod(0o444)
        cases.append((f"--generations_dir={day}", "permission denied"))
    for arg, message in cases:
        r = _generate_text(f"--ckpt={ckpt}", arg)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
        assert "sampling" not in r.stderr and r.stdout == ""
