"""The recall gate's answer-only objective (`--loss_on=answers`, MQAR's): the answer masks prepare_data.py
writes, the batches and streams that hide every other target, the loss that skips them, and a trainer
run and a plan on a gate data dir."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba_lm import recall_gate as G
from mamba_lm.data import IGNORE, TokenSplit, answers_path, load_meta
from mamba_lm.errors import UserError
from mamba_lm.streams import BookStreams
from mamba_lm.tokenizer import load_tokenizer
from mamba_lm.trainer import lm_loss, train

ROOT = Path(__file__).resolve().parent.parent
DIAL = "cpu,num_books=4,episodes_per_book=30,probe_episodes=4,filler=none,distances=16,weights=1,probe_distances=16"


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory):
    import prepare_data
    out = tmp_path_factory.mktemp("gate") / "gate"
    prepare_data.main(["--source=recall-gate", f"--gate={DIAL}", "--seq_len=32", f"--out_dir={out}",
                       "--demo_vocab_size=400"])
    return out


def test_answer_masks_mark_exactly_the_questions_answers(gate_dir):
    """Guards the masks: every split has one byte per token; the marked tokens spell answers of the dial's
    vocabulary; every question of every stored book is marked and no first statement is (a fact's first
    mention cannot be predicted, so training on it would only add noise)."""
    meta = load_meta(gate_dir)
    tok = load_tokenizer(str(gate_dir))
    dial = G.parse_dial(DIAL)
    books = {G.GATE_ID_BASE + i: b for i, b in enumerate(G.generate_books(dial))}
    values = {v for vs in G.VALUES.values() for v in vs}
    for split in ("train", "val", "test"):
        tokens = TokenSplit(gate_dir, split).tokens
        mask = np.fromfile(answers_path(gate_dir, split), dtype=np.uint8)
        assert len(mask) == len(tokens) and set(np.unique(mask)) <= {0, 1}
        questions = 0
        for book_id, start, n in meta["splits"][split]["book_spans"]:
            book = books[book_id]
            questions += len(book["probes"])
            ids, spans = G.probe_token_spans(book["TEXT"], book["probes"], tok)
            marked = np.flatnonzero(mask[start:start + n])
            assert sorted(marked) == sorted(j for a, b, _, _ in spans for j in range(a, b))
            for a, b, _, _ in spans:
                assert tok.decode(ids[a:b]).strip() in values
            stated = {p["intro_offset"] for p in book["probes"]}
            assert not any(p["char_offset"] in stated for p in book["probes"])
        assert questions > 0 and mask.sum() >= questions


def test_token_split_hides_all_but_answers(gate_dir):
    """Guards TokenSplit(loss_on="answers"): x is untouched, y equals the plain targets on the answer tokens
    and IGNORE everywhere else; loss_on="all" keeps every target."""
    plain, answers = TokenSplit(gate_dir, "train"), TokenSplit(gate_dir, "train", loss_on="answers")
    idx = list(range(min(6, plain.num_sequences)))
    x0, y0 = plain.get_batch(idx)
    x1, y1 = answers.get_batch(idx)
    assert torch.equal(x0, x1) and (y0 != IGNORE).all()
    L = plain.seq_len
    want = torch.from_numpy(np.stack([answers.scored[k * L + 1:k * L + L + 1] for k in idx]).astype(bool))
    assert want.any()
    assert torch.equal(y1[want], y0[want]) and (y1[~want] == IGNORE).all()


def test_book_streams_hide_all_but_answers(gate_dir):
    """Guards the stateful path: BookStreams given the answer mask gives the same x and resets as without it,
    and targets that are the stream's own tokens on answers and IGNORE elsewhere."""
    split = TokenSplit(gate_dir, "train", loss_on="answers")
    a = BookStreams(split.tokens, split.book_spans(), rows=2, seq_len=16, seed=3)
    b = BookStreams(split.tokens, split.book_spans(), rows=2, seq_len=16, seed=3, scored=split.scored)
    seen = 0
    for _ in range(12):
        xa, ya, ra = a.next_window()
        xb, yb, rb = b.next_window()
        assert torch.equal(xa, xb) and torch.equal(ra, rb)
        kept = yb != IGNORE
        assert torch.equal(yb[kept], ya[kept])
        seen += int(kept.sum())
    assert seen > 0


def test_lm_loss_skips_ignored_targets():
    """Guards lm_loss: with no IGNORE it is the plain mean CE; with IGNORE it is the mean over the scored
    targets only; with every target ignored it is 0 and gives zero gradients (no NaN)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    y = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(lm_loss(logits, y), F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)))
    masked = y.clone()
    masked[0, :3] = IGNORE
    keep = masked != IGNORE
    torch.testing.assert_close(lm_loss(logits, masked), F.cross_entropy(logits[keep], y[keep]))
    none = torch.full_like(y, IGNORE)
    loss = lm_loss(logits, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("stateful", [False, True])
def test_trainer_on_answers_only(gate_dir, tmp_path, train_config, tiny_model, stateful):
    """Guards a run with --loss_on=answers (windowed and stateful): it trains, its val losses are finite and
    are the loss of the answer tokens (equal to a hand-computed one on the eval subset's answers)."""
    tok = load_tokenizer(str(gate_dir))
    cfg = train_config(gate_dir, tmp_path / "run", loss_on="answers", stateful=stateful, max_steps=4,
                       batch_size=2, eval_batches=2)
    model = tiny_model(vocab_size=tok.vocab_size)
    out = train(cfg, lambda: model, script="test")
    assert out["step"] == 4 and np.isfinite(out["val_loss"])
    if stateful:
        import json
        evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        carried = [e["val_loss_carried"] for e in evals if "val_loss_carried" in e]
        assert carried and all(np.isfinite(carried))
    val = TokenSplit(gate_dir, "val", loss_on="answers")
    from mamba_lm.trainer import estimate_loss
    n = val.num_sequences
    hand = estimate_loss(model, val, list(range(n)), vocab_size=tok.vocab_size)
    x, y = val.get_batch(list(range(n)))
    with torch.no_grad():
        logits = model(x)[..., :tok.vocab_size]
    keep = y != IGNORE
    torch.testing.assert_close(torch.tensor(hand), F.cross_entropy(logits[keep], y[keep]), rtol=1e-5, atol=1e-5)


def test_loss_on_answers_needs_a_gate_data_dir(demo_data_dir, tmp_path):
    """Guards the input check: --loss_on=answers on a data dir without answer masks is one line, exit 2,
    before anything is written; an unknown --loss_on too."""
    for flag, words in (("answers", "answer mask"), ("tokens", "loss_on")):
        out = tmp_path / f"run-{flag}"
        r = subprocess.run([sys.executable, str(ROOT / "train_baseline.py"), f"--data_dir={demo_data_dir}",
                            f"--out_dir={out}", "--preset=tiny", "--device=cpu", f"--loss_on={flag}"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()
    with pytest.raises(UserError, match="answer mask"):
        TokenSplit(demo_data_dir, "train", loss_on="answers")


def test_plan_runs_on_a_gate_score_answers(tmp_path):
    """Guards the runner: runs on recall-gate data get --loss_on=answers (shared by every arm, so still
    paired), a data set's own train flags and token budget reach its runs, an arm restricted to some data
    sets runs only there, a data set can skip [evaluate], and an arm may not change the objective."""
    from mamba_lm import plan as P
    from mamba_lm.mamba import PRESETS
    text = """
name = "t"
tokens = 2048
sizes = ["tiny"]
seeds = [1]
[train]
seq_len = 32
[data.gate]
prepare = { source = "recall-gate", gate = "cpu", seq_len = 32, out_dir = "data/x-gate" }
evaluate = false
[data.demo]
prepare = { source = "demo", seq_len = 32, out_dir = "data/x-demo" }
train = { lr = 1e-3 }
tokens = 4096
[[arm]]
name = "baseline"
model = "mamba"
[[arm]]
name = "gate-only"
model = "mamba"
data = ["gate"]
"""
    path = tmp_path / "p.toml"
    path.write_text(text)
    plan = P.load_plan(str(path), {"mamba": PRESETS})
    cmds = {r.data: " ".join(P.train_command(plan, r, tmp_path / r.data, "d", 1, "py"))
            for r in plan.queue() if r.arm.name == "baseline"}
    assert "--loss_on=answers" in cmds["gate"] and "--loss_on" not in cmds["demo"] and "--lr=0.001" in cmds["demo"]
    assert plan.data["gate"]["evaluate"] is False and plan.data["demo"]["evaluate"] is True
    assert {(r.data, r.arm.name, r.tokens) for r in plan.queue()} == {
        ("gate", "baseline", 2048), ("gate", "gate-only", 2048), ("demo", "baseline", 4096)}
    path.write_text(text + 'flags = { loss_on = "all" }\n')
    with pytest.raises(UserError, match="loss_on"):
        P.load_plan(str(path), {"mamba": PRESETS})
    path.write_text(text.replace('data = ["gate"]', 'data = ["books"]'))
    with pytest.raises(UserError, match="data must be"):
        P.load_plan(str(path), {"mamba": PRESETS})


def test_filler_never_offers_a_competing_answer():
    """Guards the filler: demo-story sentences that contain a gate name or answer word (the stories mention
    flutes, maps, brave guesses) are left out, so in a generated gate book every answer word stands in a
    fact sentence of the gate, never in the filler."""
    dial = G.GateDial(bindings=2, distractors=0, candidates=4, characters=8, kinds="trait:object:place",
                      distinct_kinds=True, leads=0, distances="64:256", weights="1:1", filler="demo",
                      num_books=1, episodes_per_book=12, probe_episodes=2, seed=3)
    book = G.generate_books(dial)[0]
    facts = ("lived in", "carried a", " was ")
    for para in book["TEXT"].split("\n\n"):
        for sentence in G.split_sentences(para):
            if G.mentions_gate_word(sentence):
                assert any(f in sentence for f in facts), sentence
    assert G.mentions_gate_word("She kept her wooden Flute.") and not G.mentions_gate_word("The clock struck.")


def test_distinct_kinds_gives_each_fact_of_an_episode_its_own_kind():
    """Guards distinct_kinds: the questions of one episode ask facts of different kinds (so the verb names
    the fact), and a dial asking more facts than kinds is a one-line error."""
    dial = G.GateDial(bindings=2, distractors=0, candidates=4, characters=8, kinds="trait:object:place",
                      distinct_kinds=True, leads=0, distances="16", weights="1", filler="none",
                      num_books=1, episodes_per_book=20, probe_episodes=2, seed=4)
    probes = G.generate_books(dial)[0]["probes"]
    assert len(probes) == 40
    for i in range(0, len(probes), 2):
        assert probes[i]["kind"] != probes[i + 1]["kind"]
    with pytest.raises(UserError, match="distinct_kinds"):
        G.GateDial(bindings=3, distractors=1, kinds="place:object", distinct_kinds=True)
