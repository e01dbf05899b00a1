"""Carried state across windows (mamba_lm/stateful.py, the cache helpers of mamba_lm/mamba.py) for the
baseline and every multi-track ablation of tests/test_multitrack.py (new variants added there are covered
here too): k windows equal one long forward, per-row resets equal a fresh start at the reset token,
gradients inside a window with a detached carried state, and the kernel's differentiable last state;
and the book streams of mamba_lm/streams.py (every token once per epoch, rows never share a book, rows
split over processes, exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.mamba import mamba_config
from mamba_lm.models import build_model
from mamba_lm.errors import UserError
from mamba_lm.stateful import forward_with_resets, reset_positions
from mamba_lm.streams import BookStreams
from multitrack.narrative import build_signal_tables
from mamba_lm.tokenizer import load_tokenizer
from test_multitrack import ABLATIONS, TEXT, make_model, tiny

VARIANTS = ["mamba"] + [f"multitrack-{name}" for name in ABLATIONS]


@pytest.fixture(scope="module")
def byte_table():
    return build_signal_tables(load_tokenizer("byte"))


@pytest.fixture(scope="module")
def ids():
    """(2, 51) byte ids of fiction with paragraphs and dialogue (the narrative state has work to do)."""
    tok = load_tokenizer("byte")
    t = tok.encode(TEXT)
    return torch.tensor([t[10:61], t[70:121]])


def build(variant, table, seed=0):
    if variant == "mamba":
        torch.manual_seed(seed)
        model = build_model("mamba", mamba_config("tiny", vocab_size=257, d_model=32, n_layer=2))
    else:
        model = make_model(tiny(**ABLATIONS[variant.removeprefix("multitrack-")]), table, seed=seed)
    return model


def states(cache):
    return [t.detach().clone() for t in cache.state_tensors()]


def assert_states_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
        else:
            assert torch.equal(x, y)


def fresh_pieces(model, row_ids, row_resets):
    """Reference for one row: a fresh forward from every reset position (and from 0). -> logits, final state."""
    bounds = [0, *[t for t in range(1, len(row_ids)) if row_resets[t]], len(row_ids)]
    logits = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        cache = model.allocate_cache(1)
        logits.append(model(row_ids[None, s:e], cache=cache))
    return torch.cat(logits, 1)[0], states(cache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_windows_equal_one_long_forward(variant, byte_table, ids):
    """Guards carried state: 3 consecutive windows (odd lengths 17) through forward_with_resets with one cache,
    under grad mode (the cache is rebound, not written in place), give the logits and final state (SSM, conv
    and narrative state) of one forward over the concatenation."""
    model = build(variant, byte_table)
    full_cache = model.allocate_cache(2)
    with torch.no_grad():
        full = model(ids, cache=full_cache)
    cache = model.allocate_cache(2)
    windows = [forward_with_resets(model, w, cache)[0] for w in ids.split(17, dim=1)]
    got = torch.cat(windows, 1)
    assert got.requires_grad
    print(f"{variant}: max |windows - one forward| = {(got - full).abs().max().item():.2e}")
    torch.testing.assert_close(got.detach(), full, atol=2e-5, rtol=1e-4)
    assert_states_close(states(cache), states(full_cache))


@pytest.mark.parametrize("variant", VARIANTS)
def test_resets_inside_windows_equal_fresh_starts(variant, byte_table, ids):
    """Guards the reset convention: a row that resets at token t (inside a window, at a window start, at the
    last position) continues exactly as a fresh forward from t (logits and final state per row), while the
    other row carries its state through the split; under no_grad the cache stays in place (same tensors)."""
    model = build(variant, byte_table)
    resets = torch.zeros(2, 51, dtype=torch.bool)
    resets[0, [5, 23, 33]] = True            # inside windows 0 and 1, at the last position of window 1
    resets[1, [17, 40]] = True               # at the start of window 1, inside window 2
    ref = [fresh_pieces(model, ids[b], resets[b]) for b in range(2)]
    cache = model.allocate_cache(2)
    ptrs = [t.data_ptr() for t in cache.state_tensors()]
    with torch.no_grad():
        got = torch.cat([forward_with_resets(model, w, cache, r)[0]
                         for w, r in zip(ids.split(17, dim=1), resets.split(17, dim=1))], 1)
    assert [t.data_ptr() for t in cache.state_tensors()] == ptrs
    for b in range(2):
        torch.testing.assert_close(got[b], ref[b][0], atol=2e-5, rtol=1e-4)
        assert_states_close([t[b:b + 1] for t in states(cache)], ref[b][1])
    # and the resets matter: without them row 0 differs after t = 5
    cache.reset()
    with torch.no_grad():
        plain = forward_with_resets(model, ids[:, :17], cache)[0]
    assert (plain[0, 5:] - got[0, 5:17]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_with_detached_carried_state(variant, byte_table, ids):
    """Guards truncated BPTT inside a window: with a carried (nonzero, detached) state and a reset of row 1
    inside the window (so row 0 runs as 3 segments linked through the cache), the gradient of every parameter
    equals the reference: each row alone, its first piece from a constant copy of the carried state, the
    piece after its reset from zero, with no split of row 0. state_grad=False (the last segment's final
    state not differentiable) gives the same gradient. The carried state gets no gradient."""
    model = build(variant, byte_table)
    prefix, window = ids[:, :20], ids[:, 20:45]
    resets = torch.zeros(2, 25, dtype=torch.bool)
    resets[1, 9] = True
    resets[0, 0] = False
    with torch.no_grad():
        cache = model.allocate_cache(2)
        model(prefix, cache=cache)
    carried = states(cache)
    target = ids[:, 21:46]

    def loss_of(logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    grads = []
    for state_grad in (True, False):
        model.zero_grad()
        run_cache = model.allocate_cache(2)
        run_cache.load_state_tensors_(carried)
        logits, aux = forward_with_resets(model, window, run_cache, resets, state_grad=state_grad)
        loss_of(logits, target).backward()
        assert all(not t.requires_grad for t in carried)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if state_grad:
            assert run_cache.state_tensors()[-1].requires_grad or not run_cache.state_tensors()[-1].is_floating_point()
            run_cache.detach_()
            assert not any(t.requires_grad for t in run_cache.state_tensors())

    model.zero_grad()
    for b in range(2):
        row_cache = model.allocate_cache(1)
        row_cache.load_state_tensors_([t[b:b + 1].clone() for t in carried])
        cut = 9 if b == 1 else 25
        pieces = [model(window[b:b + 1, :cut], cache=row_cache)]
        if cut < 25:
            pieces.append(model(window[b:b + 1, cut:]))
        loss_of(torch.cat(pieces, 1), target[b:b + 1]).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert ref.keys() == grads[0].keys() == grads[1].keys() and len(ref) > 5
    for name in ref:
        torch.testing.assert_close(grads[0][name], ref[name], atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(grads[1][name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def test_reset_positions_and_aux_weighting(byte_table, ids):
    """Guards the split points (positions > 0 where any row resets) and the router aux term of a split
    window: the segments' aux terms weighted by their length (one term when the window is not split)."""
    r = torch.zeros(3, 10, dtype=torch.bool)
    r[0, 0] = r[1, 4] = r[2, 4] = r[2, 9] = True
    assert reset_positions(r) == [4, 9]
    model = build("multitrack-full", byte_table).train()
    cache = model.allocate_cache(2)
    _, aux_one = forward_with_resets(model, ids[:, :20], cache)
    assert aux_one is not None and torch.allclose(aux_one, model.aux_loss())
    resets = torch.zeros(2, 20, dtype=torch.bool)
    resets[0, 5] = True
    cache = model.allocate_cache(2)
    _, aux_split = forward_with_resets(model, ids[:, :20], cache, resets)
    cache2 = model.allocate_cache(2)
    model(ids[:, :5], cache=cache2)
    a = model.aux_loss()
    cache2.reset_rows_(torch.tensor([True, False]))
    model(ids[:, 5:20], cache=cache2)
    torch.testing.assert_close(aux_split, a * 5 / 20 + model.aux_loss() * 15 / 20)


def test_cache_helpers_in_place_without_grad_and_roundtrip(byte_table):
    """Guards the cache helpers: without autograd reset_rows_ zeroes only the chosen rows in place (same
    storage, as generation's CUDA graphs need); state_tensors/load_state_tensors_ round-trip every state
    (also the multi-track narrative state) and refuse another batch size."""
    model = build("multitrack-full", byte_table)
    cache = model.allocate_cache(3)
    with torch.no_grad():
        model(torch.randint(0, 257, (3, 9)), cache=cache)
        saved = states(cache)
        ptrs = [t.data_ptr() for t in cache.state_tensors()]
        cache.reset_rows_(torch.tensor([False, True, False]))
    assert [t.data_ptr() for t in cache.state_tensors()] == ptrs
    assert len(saved) == 2 * model.config.n_layer + 3
    for before, after in zip(saved, cache.state_tensors()):
        assert torch.equal(after[1], torch.zeros_like(after[1]))
        assert torch.equal(after[[0, 2]], before[[0, 2]])
    cache.load_state_tensors_(saved)
    assert_states_close(states(cache), saved)
    with pytest.raises(ValueError):
        model.allocate_cache(2).load_state_tensors_(saved)


def _kernel_like(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Stands in for mamba_ssm's selective_scan_fn: exact outputs, but its last_state carries no gradient."""
    out, last = ops.selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    return out, last.detach()


@pytest.mark.parametrize("groups, softplus", [(0, True), (3, True), (3, False)])
def test_state_readout_gives_the_kernel_a_differentiable_last_state(groups, softplus):
    """Guards the CUDA path of a carried state inside a window: through a scan that drops d(last_state)
    (as mamba_ssm's kernel does), `_scan_with_state_readout` + `_add_initial_state` give the outputs, the last
    state and the gradients (of u, Δ, A, B, C, D, z, Δ_bias, h0) of the reference scan, for shared and grouped
    B/C, with softplus and with the clamped Δ (softplus off, zero Δ_bias). Odd length, nonzero h0."""
    torch.manual_seed(0)
    b, d, n, l = 2, 6, 4, 7
    bc = (b, n, l) if groups == 0 else (b, groups, n, l)
    leaf = lambda *s, scale=1.0: (torch.randn(*s, dtype=torch.float32) * scale).requires_grad_()  # noqa: E731
    u, z, h0 = leaf(b, d, l), leaf(b, d, l), leaf(b, d, n)
    delta = leaf(b, d, l, scale=0.5) if softplus else torch.rand(b, d, l, dtype=torch.float32).add(0.05).requires_grad_()
    A = (-torch.rand(d, n, dtype=torch.float32) - 0.5).requires_grad_()
    B, C = leaf(*bc), leaf(*bc)
    D = leaf(d)
    bias = leaf(d, scale=0.3) if softplus else torch.zeros(d, dtype=torch.float32)
    inputs = [u, delta, A, B, C, D, z, h0] + ([bias] if softplus else [])

    out_ref, last_ref = ops.selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus, True, h0)
    out0, last0 = ops._scan_with_state_readout(_kernel_like, u, delta, A, B, C, D, bias, softplus)
    out, last = ops._add_initial_state(out0, last0, u, delta, A, C, z, bias, softplus, True, h0)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, last_ref, atol=1e-5, rtol=1e-5)
    probe_out, probe_last = torch.randn_like(out), torch.randn_like(last)
    g_ref = torch.autograd.grad((out_ref * probe_out).sum() + (last_ref * probe_last).sum(), inputs)
    g_new = torch.autograd.grad((out * probe_out).sum() + (last * probe_last).sum(), inputs, retain_graph=True)
    for a, c in zip(g_ref, g_new):
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
    g_drop = torch.autograd.grad((last0.detach() * probe_last).sum() + (out * probe_out).sum(), inputs,
                                 allow_unused=True)
    assert any(x is not None and not torch.allclose(x, y) for x, y in zip(g_drop, g_ref))   # the read-out matters


# ----------------------------------------------------------------------------------------------
# book streams (mamba_lm/streams.py)


LENGTHS = [5, 40, 13, 27, 64, 3, 33, 1, 18]          # books shorter and longer than a window


def position_streams(lengths=LENGTHS, **kw):
    """Streams over a split whose token at position p is p (so x shows where each token came from)."""
    starts = np.cumsum([0] + lengths[:-1])
    spans = [(i, int(s), n) for i, (s, n) in enumerate(zip(starts, lengths))]
    return BookStreams(np.arange(sum(lengths)), spans, **kw), spans


@pytest.mark.parametrize("rows, seq_len", [(3, 8), (4, 7), (9, 16)])
def test_streams_read_every_token_once_per_epoch(rows, seq_len):
    """Guards the stream bookkeeping: each row's x is exactly the concatenation of its books (whole, in the
    order dealt); every book of an epoch is dealt to one row only; once `epoch` reaches 1 every token of the
    split has been read exactly once (twice for none); resets sit exactly on each book's last token (its
    eos); y is x shifted by one within the row's stream."""
    streams, spans = position_streams(rows=rows, seq_len=seq_len, seed=3)
    read = [[] for _ in range(rows)]
    dealt = [[] for _ in range(rows)]                  # what the queue dealt to each row, in order
    deal = streams._deal

    def logged_deal(row):
        deal(row)
        dealt[row].append(tuple(streams.row_books[row][-1]))
    streams._deal = logged_deal
    last_tokens = {s + n - 1 for _, s, n in spans}
    counts = np.zeros(sum(LENGTHS), dtype=int)
    while streams.epoch < 1:
        x, y, resets = streams.next_window()
        for r in range(rows):
            read[r].extend(x[r].tolist())
            assert resets[r].tolist() == [p in last_tokens for p in x[r].tolist()]
            assert torch.equal(y[r, :-1], x[r, 1:])
    owners = {}
    for r in range(rows):
        for eb in dealt[r]:
            assert eb not in owners, f"book {eb} dealt to rows {owners[eb]} and {r}"
            owners[eb] = r
        tagged = [(e, p) for e, book in dealt[r] for p in range(spans[book][1], spans[book][1] + spans[book][2])]
        assert read[r] == [p for _, p in tagged[:len(read[r])]]
        np.add.at(counts, [p for e, p in tagged[:len(read[r])] if e == 0], 1)
    assert sorted(b for e, b in owners if e == 0) == list(range(len(spans)))
    assert counts.min() == counts.max() == 1                   # epoch 0: every token read exactly once
    assert sum(len(v) for v in read) == streams.windows * rows * seq_len


def test_streams_rows_split_over_processes_and_resume():
    """Guards DDP/grad_accum independence and exact resume: reading rows 0-1 and 2-3 in two instances
    gives the same windows as reading all 4 rows in one; a position saved with state_dict and loaded into
    fresh streams continues with the same windows; a position for other streams is refused."""
    full, _ = position_streams(rows=4, seq_len=6, seed=1)
    parts = [position_streams(rows=4, seq_len=6, seed=1)[0] for _ in range(2)]
    for k in range(12):
        x, y, r = full.next_window()
        if k == 5:
            saved = full.state_dict()
            resumed, _ = position_streams(rows=4, seq_len=6, seed=1)
            resumed.load_state_dict(saved)
        if k > 5:
            rx, ry, rr = resumed.next_window()
            assert torch.equal(rx, x) and torch.equal(ry, y) and torch.equal(rr, r)
        a, b = parts[0].next_window(rows=range(0, 2)), parts[1].next_window(rows=range(2, 4))
        for got, want in zip((torch.cat([a[i], b[i]]) for i in range(3)), (x, y, r)):
            assert torch.equal(got, want)
    json.dumps(saved)                                            # JSON-able (checkpoints, logs)
    other, _ = position_streams(rows=4, seq_len=7, seed=1)
    with pytest.raises(UserError):
        other.load_state_dict(saved)
    with pytest.raises(UserError):
        position_streams(rows=len(LENGTHS) + 1, seq_len=4)


def test_streams_on_a_prepared_split(demo_data_dir):
    """Guards the data contract: on a prepared split (byte tokens, eos after each book) the resets are
    exactly the eos tokens of x, and the epoch's book order depends on the seed."""
    from mamba_lm.data import TokenSplit
    split = TokenSplit(demo_data_dir, "train")
    eos = split.meta["tokenizer"]["eos_id"]
    streams = BookStreams(split.tokens, split.book_spans(), rows=2, seq_len=64, seed=0)
    n_eos = 0
    for _ in range(streams.windows_per_epoch()):
        x, y, resets = streams.next_window()
        assert torch.equal(resets, x == eos)
        n_eos += int(resets.sum())
    assert n_eos >= 1
    orders = {tuple(BookStreams(split.tokens, split.book_spans(), rows=1, seq_len=8, seed=s).next_window()[0][0].tolist())
              for s in range(6)}
    assert len(orders) > 1
