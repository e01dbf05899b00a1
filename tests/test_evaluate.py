"""evaluate.py end to end on tiny checkpoints and a tiny demo data dir (subprocesses, CPU)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--seq_len=32", "--batch_size=32", "--max_sequences=0", "--book_tokens=512", "--window=256",
        "--book_batch_size=2", "--num_prompts=2", "--prompt_tokens=48", "--gen_tokens=24", "--device=cpu",
        "--recall_stories=1"]


def save_tiny_checkpoint(path, tokenizer, seed: int):
    """A repo checkpoint (CONTRACTS.md format) of a randomly initialised tiny Mamba for `tokenizer`."""
    import torch

    from mamba_lm.checkpoint import save_checkpoint
    from mamba_lm.mamba import mamba_config
    from mamba_lm.models import build_model, model_config_dict

    torch.manual_seed(seed)
    model = build_model("mamba", mamba_config("tiny", vocab_size=tokenizer.vocab_size, d_model=16, n_layer=1,
                                                  d_state=4))
    save_checkpoint(path, {
        "model_type": "mamba", "model_config": model_config_dict(model), "model": model.state_dict(),
        "optimizer": None, "train_config": {"seed": seed}, "tokenizer": tokenizer.to_dict(),
        "data": {"dir": "tiny", "fingerprint": "f" * 64, "seq_len": 32}, "step": 7 + seed, "epoch": 0,
        "step_in_epoch": 7, "tokens_seen": 1234, "best_val_loss": 9.9, "metrics": {}, "rng": {}, "history": [],
        "script": "test"})
    return path


def run_eval(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A demo data dir (byte tokenizer, seq_len 32) and two tiny checkpoints for it."""
    from conftest import make_data_dir
    from mamba_lm.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    data = make_data_dir(root / "data", seq_len=32, num_books=6, words_per_book=600)
    tok = load_tokenizer("byte")
    a = save_tiny_checkpoint(root / "runA" / "ckpt_best.pt", tok, seed=0)
    b = save_tiny_checkpoint(root / "runB" / "ckpt_best.pt", tok, seed=1)
    return root, data, a, b


@pytest.fixture(scope="module")
def report(setup):
    """One full evaluation of both checkpoints side by side (all stages)."""
    root, data, a, b = setup
    out = root / "reports" / "eval.md"
    r = run_eval([f"--ckpts={a},{b}", "--names=alpha,beta", f"--data_dir={data}", f"--out={out}",
                  f"--state_dir={root / 'state'}", *TINY], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_report_has_sections_tables_and_pngs(report):
    """The markdown report holds every section, both checkpoints, and links PNGs that exist."""
    out, r = report
    text = out.read_text()
    for heading in ("## Checkpoints", "## Data", "## Token loss", "## Loss by position in the context",
                    "## Loss by token type",
                    "## Beyond the training length", "## Generation", "## Long-range recall", "## Settings"):
        assert heading in text, heading
    assert "alpha" in text and "beta" in text and "real continuation" in text
    for png in ("eval_positions.png", "eval_books.png"):
        assert (out.parent / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert "| 512-1023 |" not in text and "| 16-31 |" in text          # buckets of a 32-token context
    assert "Traceback" not in r.stderr


def test_generation_note_states_the_loop_settings(report):
    """The generation section's definition of a loop shows the values used (loop_min_period=4,
    loop_repeats=3), not the unformatted placeholders."""
    text = report[0].read_text()
    assert "a block of >= 4 tokens repeated 3 times back to back" in text
    assert "{loop_min_period}" not in text and "{loop_repeats}" not in text


def test_loss_numbers_are_consistent_with_the_data(report, setup):
    """Token/byte/word counts in the JSON equal those computed directly from the test split, and
    bits per byte and word perplexity follow from the same total NLL."""
    from mamba_lm.data import TokenSplit

    out, _ = report
    _, data, _, _ = setup
    res = json.loads(out.with_suffix(".json").read_text())["results"]["alpha"]["loss"]
    split = TokenSplit(data, "test", seq_len=32)
    n = split.num_sequences
    targets = np.asarray(split.tokens[1:n * 32 + 1], dtype=np.int64)
    assert res["tokens"] == n * 32
    assert res["bytes"] == int((targets != 256).sum())                  # byte tokenizer: 1 byte per id, eos 0
    expected_words = sum(len(chunk.decode("utf-8", errors="replace").split())
                         for chunk in _split_at_eos(targets))
    assert res["words"] == expected_words
    total = res["loss"] * res["tokens"]
    assert res["bits_per_byte"] == pytest.approx(total / math.log(2) / res["bytes"])
    assert res["word_ppl"] == pytest.approx(math.exp(total / res["words"]))
    assert len(res["position_loss"]) == 32
    assert np.mean(res["position_loss"]) == pytest.approx(res["loss"], rel=1e-6)
    assert 3.0 < res["loss"] < 7.0                                        # random init over 257 ids: ~ln 257
    types = res["token_types"]
    assert types["all"]["tokens"] == res["tokens"] and types["all"]["loss"] == pytest.approx(res["loss"])
    assert types["dialogue"]["tokens"] + types["narration"]["tokens"] == res["tokens"]
    assert types["dialogue"]["tokens"] > 0                                 # the demo stories have dialogue


def _split_at_eos(targets):
    chunk = []
    for t in targets.tolist():
        if t == 256:
            yield bytes(chunk)
            chunk = []
        else:
            chunk.append(t)
    yield bytes(chunk)


def test_books_and_recall_results(report):
    """Whole-book evaluation scores the same tokens carried and reset (window 0 identical); the recall
    probe finds probes in the demo book and reports accuracies in [0, 1]."""
    out, _ = report
    res = json.loads(out.with_suffix(".json").read_text())["results"]["beta"]
    rows = res["books"]["rows"]
    assert len(rows) == 2 and rows[0]["carried"] == pytest.approx(rows[0]["reset"], abs=1e-5)
    assert rows[1]["first_token"] == 256
    assert sum(r["tokens"] for r in rows) == res["books"]["tokens"] == 512
    rec = res["recall"]
    assert rec["probes"] > 0 and 0.0 <= rec["accuracy"] <= 1.0
    assert sum(b["probes"] for b in rec["buckets"].values()) == rec["probes"]
    gen = res["generation"]
    assert gen["prompts"] == 1 and 0.0 <= gen["model"]["distinct_1"] <= 1.0


def test_resume_reuses_finished_stages(report, setup):
    """A re-run with --resume=True reuses every finished stage (same checkpoint, data and settings) and
    reproduces the numbers; a changed setting recomputes only that stage."""
    root, data, a, b = setup
    out, _ = report
    out2 = root / "reports" / "eval_resumed.md"
    r = run_eval([f"--ckpts={a},{b}", "--names=alpha,beta", f"--data_dir={data}", f"--out={out2}",
                  f"--state_dir={root / 'state'}", "--resume=True", "--gen_tokens=16",
                  *[t for t in TINY if not t.startswith("--gen_tokens")]], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reusing finished results") == 6               # loss, books, recall x 2 checkpoints
    assert "generation: done" in r.stdout
    first = json.loads(out.with_suffix(".json").read_text())["results"]
    second = json.loads(out2.with_suffix(".json").read_text())["results"]
    assert second["alpha"]["loss"]["loss"] == first["alpha"]["loss"]["loss"]
    assert second["beta"]["generation"]["model"]["tokens"] <= 16


def test_tokenizer_mismatch_is_a_one_line_error(setup, tmp_path):
    """A checkpoint whose tokenizer differs from the data's fails with one 'tokenizer mismatch' line, exit 2."""
    from mamba_lm.tokenizer import train_demo_bpe

    root, data, _, _ = setup
    bpe = train_demo_bpe(["the cat sat on the mat " * 20, "a dog ran far away"], vocab_size=280)
    ckpt = save_tiny_checkpoint(tmp_path / "bpe.pt", bpe, seed=0)
    r = run_eval([f"--ckpts={ckpt}", f"--data_dir={data}", f"--out={tmp_path / 'x.md'}", "--stages=loss",
                  f"--state_dir={tmp_path / 'state'}", "--device=cpu"], cwd=tmp_path)
    assert r.returncode == 2
    assert "tokenizer mismatch" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.md").exists()


def test_bad_arguments_are_one_line_errors(setup, tmp_path):
    """An unknown stage, a missing checkpoint, an unsupported dtype and non-integer recall edges are
    one-line errors (exit 2) before any work, not stages skipped in a report."""
    root, data, a, _ = setup
    for args, needle in (([f"--ckpts={a}", "--stages=loss,bogus"], "unknown"),
                         ([f"--ckpts={a},nope.pt", "--names=x,y"], "nope.pt not found"),
                         ([f"--ckpts={a}", "--stages=loss", "--dtype=float16"], "float32 or bfloat16"),
                         ([f"--ckpts={a}", "--stages=recall", "--recall_distance_edges=0,1k"],
                          "comma-separated integers")):
        r = run_eval([*args, f"--data_dir={data}", "--device=cpu", f"--out={tmp_path / 'x.md'}"], cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "x.md").exists()


def test_hf_and_mamba_ssm_folders_evaluate_like_the_checkpoint(setup, tmp_path):
    """An exported HF folder and a tokenizer-less mamba-ssm folder (via mamba_lm.weights) give the same
    token loss as the repo checkpoint they came from, side by side in one report."""
    from mamba_lm.weights import export_hf, export_mamba_ssm

    root, data, a, _ = setup
    export_hf(str(a), tmp_path / "hf")
    export_mamba_ssm(str(a), tmp_path / "ssm")
    (tmp_path / "ssm" / "tokenizer.json").unlink(missing_ok=True)      # state-spaces/mamba-* ship none
    out = tmp_path / "folders.md"
    r = run_eval([f"--ckpts={a},{tmp_path / 'hf'},{tmp_path / 'ssm'}", f"--data_dir={data}", f"--out={out}",
                  "--stages=loss", "--seq_len=32", "--max_sequences=4", "--device=cpu",
                  f"--state_dir={tmp_path / 'state'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())["results"]
    losses = [v["loss"]["loss"] for v in res.values()]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-5


def load_evaluate(monkeypatch, args):
    """evaluate.py imported as a module with `args` as its command line (its config is read at import)."""
    import importlib.util

    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    spec = importlib.util.spec_from_file_location("evaluate_under_test", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SimulatedCrash(Exception):
    pass


def test_interrupted_stages_continue_from_partial_sums(setup, tmp_path, monkeypatch, capsys):
    """A loss stage and a books stage killed after a partial save continue from it with --resume=True
    (no sequence or book scored twice or skipped) and give exactly the numbers of an uninterrupted run."""
    root, data, a, _ = setup
    args = [f"--ckpts={a}", f"--data_dir={data}", "--split=train", "--stages=loss,books", "--save_every=0",
            "--seq_len=32", "--batch_size=3", "--max_sequences=40", "--book_tokens=256", "--window=64",
            "--book_batch_size=1", "--max_books=4", "--device=cpu"]
    load_evaluate(monkeypatch, [*args, f"--out={tmp_path / 'full.md'}", f"--state_dir={tmp_path / 's1'}"]).main()
    full = json.loads((tmp_path / "full.json").read_text())["results"]

    def run(crash_stage, after, resume):
        ev = load_evaluate(monkeypatch, [*args, f"--out={tmp_path / 'cut.md'}", f"--state_dir={tmp_path / 's2'}",
                                         f"--resume={resume}"])
        real, saves = ev.save_state, []

        def save_then_maybe_crash(path, state):
            real(path, state)
            if crash_stage in state.get("partial", {}):
                saves.append(state["partial"][crash_stage]["progress"]["next"])
                if len(saves) == after:
                    raise SimulatedCrash(crash_stage)
        ev.save_state = save_then_maybe_crash
        if crash_stage:
            with pytest.raises(SimulatedCrash):
                ev.main()
        else:
            ev.main()
        return saves

    assert run("loss", 4, False) == [3, 6, 9, 12]                 # killed after 12 of 40 sequences
    assert run("books", 2, True) == [1, 2]                          # loss continues from 12; books killed after 2
    capsys.readouterr()
    run(None, 0, True)
    out = capsys.readouterr().out
    assert "loss: reusing finished results" in out and "books: continuing from book 2 of 4" in out
    cut = json.loads((tmp_path / "cut.json").read_text())["results"]
    for stage in ("loss", "books"):
        a_res = {k: v for k, v in full[a.parent.name + "/ckpt_best"][stage].items() if k != "seconds"}
        b_res = {k: v for k, v in cut[a.parent.name + "/ckpt_best"][stage].items() if k != "seconds"}
        assert a_res == b_res, stage


def test_position_loss_matches_a_direct_forward(report, setup):
    """The per-position table of the loss stage equals the mean over all test sequences of the NLL at each
    position, computed here with one direct forward of the checkpoint."""
    import torch

    from mamba_lm import metrics as M
    from mamba_lm.checkpoint import model_from_checkpoint
    from mamba_lm.data import TokenSplit

    out, _ = report
    _, data, a, _ = setup
    res = json.loads(out.with_suffix(".json").read_text())["results"]["alpha"]["loss"]
    model, _ = model_from_checkpoint(str(a))
    split = TokenSplit(data, "test", seq_len=32)
    x, y = split.get_batch(np.arange(split.num_sequences))
    with torch.no_grad():
        nll = M.token_nll(model.eval(), x, y, 257).double()                 # (n, 32)
    assert np.allclose(res["position_loss"], nll.mean(0).numpy(), atol=1e-5)
    assert res["position_buckets"][-1]["label"] == "16-31"
    assert res["position_buckets"][-1]["loss"] == pytest.approx(float(nll[:, 16:].mean()), abs=1e-5)


def test_folder_tokenizer_mismatch_fails_before_any_work(setup, tmp_path):
    """HF / mamba-ssm folders are checked against the data's tokenizer before the first checkpoint is
    evaluated: a folder with another tokenizer, and a tokenizer-less folder with another vocabulary size,
    each stop the run with one line naming the folder (exit 2), with no stage run and no report written."""
    from mamba_lm.weights import export_hf, export_mamba_ssm
    from mamba_lm.tokenizer import train_demo_bpe

    root, data, a, _ = setup
    bpe = train_demo_bpe(["the cat sat on the mat " * 20, "a dog ran far away"], vocab_size=280)
    export_hf(str(save_tiny_checkpoint(tmp_path / "bpe.pt", bpe, seed=0)), tmp_path / "hf_bpe")
    export_mamba_ssm(str(save_tiny_checkpoint(tmp_path / "bpe2.pt", bpe, seed=0)), tmp_path / "ssm_bpe")
    (tmp_path / "ssm_bpe" / "tokenizer.json").unlink()
    for folder, needle in ((tmp_path / "hf_bpe", "tokenizer mismatch"), (tmp_path / "ssm_bpe", "has no tokenizer")):
        r = run_eval([f"--ckpts={a},{folder}", f"--data_dir={data}", f"--out={tmp_path / 'x.md'}", "--stages=loss",
                      "--seq_len=32", f"--state_dir={tmp_path / 'state'}", "--device=cpu"], cwd=tmp_path)
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr and str(folder) in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "loss: done" not in r.stdout and not (tmp_path / "x.md").exists()


def test_long_range_stages_end_to_end(setup, tmp_path, monkeypatch, capsys):
    """--stages=longrange,chapters on whole demo books: the report has the three long-range sections with
    their PNGs, the JSON's name and position rows add up to the books' tokens, carried equals reset inside
    the first window, and a re-run with --resume=True reuses both stages."""
    root, data, a, _ = setup
    out = tmp_path / "long.md"
    args = [f"--ckpts={a}", "--names=alpha", f"--data_dir={data}", "--split=train", "--stages=longrange,chapters",
            "--window=128", "--chapter_tokens=16", "--device=cpu", f"--state_dir={tmp_path / 'state'}"]
    r = run_eval([*args, f"--out={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    for heading, png in (("## Recurring names by distance", "long_names.png"),
                         ("## Loss by position into the book", "long_deep.png"),
                         ("## Next-chapter ranking", "long_chapters.png")):
        assert heading in text and f"]({png})" in text and (tmp_path / png).stat().st_size > 1000
    assert "| 1k-4k |" in text and "first mention" in text
    res = json.loads(out.with_suffix(".json").read_text())["results"]["alpha"]
    lr, ch = res["longrange"], res["chapters"]
    assert lr["books"] == 4 and sum(r["tokens"] for r in lr["positions"]) == lr["tokens"]
    assert lr["name_targets"] == sum(r["targets"] for r in lr["names"][:5]) > 0
    assert all(r["carried"] == pytest.approx(r["reset"], abs=1e-5) for r in lr["positions"] if r["hi"] <= 128)
    assert ch["carried"]["breaks"] == ch["reset"]["breaks"] > 0
    assert 0.0 <= ch["carried"]["accuracy"] <= 1.0 and 1.0 <= ch["carried"]["mean_rank"] <= ch["carried"]["candidates"]
    capsys.readouterr()
    load_evaluate(monkeypatch, [*args, f"--out={tmp_path / 'again.md'}", "--resume=True"]).main()
    assert capsys.readouterr().out.count("reusing finished results") == 2


def test_long_range_settings_are_checked_before_any_work(setup, tmp_path, monkeypatch, capsys):
    """A chapter opening as long as the window, fewer than two candidates or no positions are UserErrors
    (one line, exit 2) raised before any checkpoint is loaded or file written."""
    from mamba_lm.errors import UserError

    root, data, a, _ = setup
    for bad, needle in (("--chapter_tokens=32", "--chapter_tokens=32"), ("--chapter_candidates=1", "must be >= 2"),
                        ("--position_tokens=0", "--position_tokens=0")):
        ev = load_evaluate(monkeypatch, [f"--ckpts={a}", f"--data_dir={data}", "--stages=longrange,chapters",
                                         "--seq_len=32", bad, "--device=cpu", f"--out={tmp_path / 'x.md'}"])
        with pytest.raises(UserError, match=needle):
            ev.main()
        assert "==" not in capsys.readouterr().out and not (tmp_path / "x.md").exists()
