"""The GPU-lease tooling that runs on CPU: held-out prompts (bench/book_openings.py), the run comparison
(bench/compare_runs.py) and the resumable queue of bench/gpu_runs.sh (with a stub in place of python)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run_script(script, *args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# book_openings.py


@pytest.fixture()
def book_openings(monkeypatch):
    """The script as a module (its flags are parsed from sys.argv at import: give it none)."""
    import importlib

    monkeypatch.setattr(sys, "argv", ["book_openings.py"])
    sys.modules.pop("book_openings", None)
    return importlib.import_module("book_openings")


def test_opening_cuts_at_paragraph_or_sentence_end_not_after_mr(book_openings):
    """The prompt starts after the first paragraph break and ends at a paragraph or sentence end;
    'Mr.' is no sentence end."""
    text = "tail of a title\n\nIt was a dark night. The wind rose, and Mr. Hale went out to"
    assert book_openings.opening(text) == "It was a dark night."
    text = "x\n\nFirst paragraph here, long enough to count as one.\n\nSecond one that is cut off mid"
    assert book_openings.opening(text) == "First paragraph here, long enough to count as one."


def test_is_prose_rejects_tables_of_contents(book_openings):
    """Upper-case heading lists (title pages, contents) are not prompts; ordinary sentences are."""

    assert not book_openings.is_prose("CHAPTER I. THE RIVER\n\nCHAPTER II. THE TOWN\n\nCHAPTER III. THE SEA AND THE END")
    assert book_openings.is_prose("The river ran low that summer, and the boys walked along its dry bed down to the old mill.")
    assert not book_openings.is_prose("Too short.")


def test_openings_file_holds_test_book_prose_that_generate_text_reads(demo_data_dir, tmp_path):
    """The prompt file has one prompt per held-out book, each a piece of that split's text, and
    generate_text's read_prompts gives them back unchanged."""
    from mamba_lm.data import TokenSplit
    from mamba_lm.generation import read_prompts
    from mamba_lm.tokenizer import load_tokenizer

    out = tmp_path / "prompts.txt"
    r = run_script("book_openings.py", f"--data_dir={demo_data_dir}", "--split=test", "--num_books=3",
                   "--skip_tokens=100", "--prompt_tokens=400", f"--out={out}")
    assert r.returncode == 0, r.stderr
    prompts = read_prompts("", str(out))
    data = TokenSplit(demo_data_dir, "test")
    assert len(prompts) == len(data.book_spans()) == 1
    book_text = load_tokenizer("byte").decode(data.tokens.tolist())
    assert prompts[0] in book_text and len(prompts[0]) >= 80
    assert prompts[0].rstrip()[-1] in ".!?\"'”’)"


def test_openings_too_short_books_are_a_one_line_error(demo_data_dir, tmp_path):
    """Books shorter than skip + prompt tokens: a one-line error naming the flags to lower, no file."""
    out = tmp_path / "p.txt"
    r = run_script("book_openings.py", f"--data_dir={demo_data_dir}", "--skip_tokens=100000", f"--out={out}")
    assert r.returncode != 0
    assert "lower --skip_tokens" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# compare_runs.py


def write_metrics(path: Path, losses, tok_s, val, full_val, resumed_step=None):
    rows = [{"kind": "config", "step": 0, "num_params": 1234}]
    for i, (loss, speed) in enumerate(zip(losses, tok_s), 1):
        rows.append({"kind": "train", "step": 10 * i, "tokens": 1000 * i, "train_loss": loss, "tok_per_s": speed})
    if resumed_step:  # a resumed run logs a step again: the later row must win
        rows.insert(2, {"kind": "train", "step": resumed_step, "tokens": 1000, "train_loss": 99.0, "tok_per_s": 1.0})
    rows.append({"kind": "eval", "step": 10 * len(losses), "tokens": 1000 * len(losses), "val_loss": val, "minutes": 1.5})
    rows.append({"kind": "epoch", "step": 10 * len(losses), "val_loss": full_val, "minutes": 2.0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_compare_runs_table_and_plot(tmp_path):
    """Final train loss = mean of the last `tail` logs, tokens/s = median after `skip`, full val loss
    from the epoch row; a repeated (resumed) step counts once; the PNG is written."""
    a, b = tmp_path / "base-metrics.jsonl", tmp_path / "mt-metrics.jsonl"
    write_metrics(a, [5.0, 4.0, 3.0, 2.0], [1, 100, 200, 300], val=2.5, full_val=2.6, resumed_step=10)
    write_metrics(b, [6.0, 5.0, 4.0, 3.0], [1, 50, 60, 70], val=3.5, full_val=3.6)
    png = tmp_path / "cmp.png"
    r = run_script("compare_runs.py", f"--runs={a},{b}", f"--out={png}", "--tail=2", "--skip=1")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("| base") or line.startswith("| mt")]
    assert lines[0].split("|")[1:-1] == [" base ", " 1,234 ", " 4,000 ", " 40 ", " 2.5000 ", " 2.5000 ",
                                         " 2.6000 ", " 2.0 ", " 200 "]
    assert lines[1].split("|")[5].strip() == "3.5000" and lines[1].split("|")[9].strip() == "60"
    assert png.stat().st_size > 1000


def test_compare_runs_missing_file_is_a_one_line_error(tmp_path):
    """A path that is neither an out_dir with metrics.jsonl nor a metrics file: one-line error."""
    r = run_script("compare_runs.py", f"--runs={tmp_path / 'nope'}")
    assert r.returncode != 0 and "no metrics file" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
# gpu_runs.sh all: the queue logic, with a stub in place of python


@pytest.fixture()
def queue(tmp_path):
    stub = tmp_path / "stub-python"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$STUB_LOG"\n'
                    'case "$1" in train_*) exit "${STUB_TRAIN_EXIT:-0}" ;; esac\nexit 0\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PY=str(stub), STUB_LOG=str(tmp_path / "calls.log"), RESULTS=str(tmp_path / "results"),
               QUEUE_STATE=str(tmp_path / "state" / "done.txt"), DATA=str(tmp_path / "data"), DATA_SRC="src",
               DATA_TOK="tok.json", RUNS="baseline-s7 multitrack-s7", STAGES="train eval")

    def run(budget=300, train_exit=0, **extra):
        r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_runs.sh"), "all"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env=dict(env, BUDGET_S=str(budget), STUB_TRAIN_EXIT=str(train_exit),
                                                            **extra))
        calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
        done = (tmp_path / "state" / "done.txt").read_text().split()
        return r, calls, done
    return run


def test_queue_resumes_a_stopped_run_and_skips_finished_stages(queue):
    """A run stopped at the budget (exit 143) leaves the queue at exit 3 with the run not done; the next
    call resumes it, then runs eval; a third call runs nothing again. The run's name sets its seed."""
    r, calls, done = queue(train_exit=143)
    assert r.returncode == 3 and "resumes next call" in r.stdout
    assert done == ["data"] and sum(c.startswith("train_") for c in calls) == 1
    assert calls[-1].startswith("train_baseline.py") and "--seed=7" in calls[-1] and "--resume=False" in calls[-1]

    r, calls, done = queue()
    assert r.returncode == 0 and "all stages done" in r.stdout
    assert done == ["data", "train:baseline-s7", "train:multitrack-s7", "eval"]
    assert [c.split()[0] for c in calls if c.startswith("train_")] == ["train_baseline.py"] * 2 + ["train_multitrack.py"]

    n = len(calls)
    r, calls, done = queue()
    assert r.returncode == 0 and len(calls) == n


def test_queue_starts_no_stage_without_the_time_it_needs(queue):
    """With less budget than a stage needs, the queue stops before it (exit 3) and says so."""
    r, calls, done = queue(budget=30)
    assert r.returncode == 3 and "stopping here" in r.stdout
    assert not any(c.startswith("train_") for c in calls)


# ---------------------------------------------------------------------------------------------
# profile_step.py


def test_profile_step_reports_time_by_family_for_each_model(tmp_path):
    """On CPU (tiny preset) the profile of a training step lists wall and busy time, families whose times
    add up to the busy time, and the top ops, for our model and the multi-track model; mamba-ssm, not
    installed here, is reported as such instead of failing the run. --csv_dir writes every op of each run,
    whose times add up to the same busy time."""
    import csv
    import re

    r = run_script("profile_step.py", "--preset=tiny", "--seq_len=32", "--batch_sizes=2", "--device=cpu",
                   "--steps=1", "--warmup=1", "--top=4", f"--csv_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "### mamba_ssm, batch 2: not installed" in out
    for impl in ("ours", "multitrack"):
        section = out.split(f"### {impl}, batch 2 x 32:")[1].split("###")[0]
        busy = float(re.search(r"([\d.]+) ms busy", section).group(1))
        fams = [float(m) for m in re.findall(r"^\| [a-z /-]+ \| ([\d.]+) \| [\d.]+% \|$", section, re.MULTILINE)]
        assert fams and abs(sum(fams) - busy) < 0.05 * busy + 0.05
        assert "`aten::mm`" in section or "`aten::addmm`" in section
        rows = list(csv.DictReader(open(tmp_path / f"profile-{impl}-b2.csv")))
        assert len(rows) > 4 and abs(sum(float(x["ms_per_step"]) for x in rows) - busy) < 0.05 * busy + 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile-multitrack-b2.csv", "profile-ours-b2.csv"]


def test_queue_runs_a_tagged_stage_again_and_prepares_no_data_without_training(queue):
    """NAME@TAG runs stage NAME a second time under its own label; a plan without training runs no
    data preparation."""
    r, calls, done = queue(STAGES="decode decode@again")
    assert r.returncode == 0 and done == ["decode", "decode@again"]
    assert [c.split()[0] for c in calls] == ["bench/bench_decode.py"] * 2


# ---------------------------------------------------------------------------------------------
# count_ops.py


def test_count_ops_counts_the_training_step_of_both_models():
    """The CPU proxy for a launch-bound GPU step: per model a positive op count in which the selective scan
    and the causal conv each count once per layer forward and once backward (as the CUDA kernels they are
    on a GPU), the multi-track model dispatching more ops than the baseline; the same count twice."""
    import re

    args = ("--preset=tiny", "--seq_len=16", "--vocab_size=64")
    r = run_script("count_ops.py", *args)
    assert r.returncode == 0, r.stderr
    counts = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"^(\w+): ([\d,]+) ops", r.stdout, re.M)}
    assert set(counts) == {"ours", "multitrack"} and 0 < counts["ours"] < counts["multitrack"]
    kernels = re.findall(r"^  as one op each: (.*)$", r.stdout, re.M)                 # tiny: 2 layers
    assert kernels == ["selective_scan 2 + 2 backward, causal_conv1d 2 + 2 backward"] * 2
    again = run_script("count_ops.py", *args)
    assert again.stdout.split("multitrack / ours")[1] == r.stdout.split("multitrack / ours")[1]


# ---------------------------------------------------------------------------------------------
# bench_decode.py


def test_bench_decode_measures_the_multitrack_model_and_rejects_unknown_models():
    """--model=multitrack decodes the matching multi-track preset (its speed row named so, no mamba-ssm
    row, since mamba-ssm has no such model) and reads memory at each requested length; on the CPU the
    batch-1 bandwidth bound and the load average come with it, the bound measured around each of the
    `repeats` batch-1 runs and the median run's fraction reported; an unknown --model is a one-line error."""
    import json

    r = run_script("bench_decode.py", "--model=multitrack", "--preset=tiny", "--vocab_size=64",
                   "--batch_sizes=1,2", "--decode_tokens=8", "--gen_lengths=16,48", "--repeats=3")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(row["impl"], row["batch"]) for row in result["speed"]] == [("multitrack", 1), ("multitrack", 2)]
    assert all(row["tokens_per_s"] > 0 for row in result["speed"])
    assert sorted(result["memory_gib"]) == ["16", "48"] and result["config"]["model"] == "multitrack"
    bound = result["batch1_bound"]                      # CPU: weights / read rate, measured in the same run
    assert bound["read_gb_per_s"] > 0 and bound["tokens_per_s"] > 0
    assert result["speed"][0]["fraction_of_bound"] > 0 and len(result["machine"]["load_after"]) == 3
    rounds = result["speed"][0]["rounds"]                # one bound per timed run, at that run's moment
    assert len(rounds) == 3 and "rounds" not in result["speed"][1]
    assert all(abs(r["fraction"] - r["tokens_per_s"] / r["bound_tokens_per_s"]) < 1e-9 for r in rounds)
    assert all(r["tensor_sums_tokens_per_s"] > 0 for r in rounds)
    assert result["speed"][0]["fraction_of_bound"] == sorted(r["fraction"] for r in rounds)[1]
    bad = run_script("bench_decode.py", "--model=transformer", "--preset=tiny")
    assert bad.returncode != 0 and "expected 'mamba' or 'multitrack'" in bad.stderr and "Traceback" not in bad.stderr


def test_count_ops_decode_mode_counts_one_step_without_no_op_conversions():
    """--mode=decode counts the aten ops of one model.step() for each model (a positive count, JSON on the
    last line) and the baseline's step dispatches no dtype conversion, no repeat_interleave and
    no exp of A_log (kept between tokens); an unknown mode is a one-line error."""
    import re

    args = ("--mode=decode", "--preset=tiny", "--vocab_size=64", "--batch_size=1", "--top=40")
    r = run_script("count_ops.py", *args)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["mode"] == "decode" and set(result["ops"]) == {"ours", "multitrack"}
    assert all(n > 0 for n in result["ops"].values())
    ours = re.search(r"^ours: .*$", r.stdout, re.M).group(0)
    for absent in ("to ", "_to_copy", "repeat_interleave", "exp ", "neg "):
        assert f"({absent}" not in ours and f", {absent}" not in ours, ours
    bad = run_script("count_ops.py", "--mode=inference", "--preset=tiny")
    assert bad.returncode == 2 and "expected 'train' or 'decode'" in bad.stderr + bad.stdout


# ---------------------------------------------------------------------------------------------
# bench_throughput.py


def test_bench_throughput_cpu_records_machine_state_and_rejects_unknown_scan():
    """On the CPU the JSON line carries the thread count and the load average before and after the run (the
    figures' context on a shared machine) and each row a fastest-step time; --cpu_scan accepts only eager /
    compiled, with a one-line error."""
    r = run_script("bench_throughput.py", "--preset=tiny", "--vocab_size=64", "--seq_len=16", "--batch_sizes=2",
                   "--steps=2", "--warmup=1", "--device=cpu", "--threads=1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    machine = result["machine"]
    assert machine["threads"] == 1 and len(machine["load_before"]) == 3 and len(machine["load_after"]) == 3
    ours = result["rows"][0]
    assert ours["status"] == "ok" and 0 < ours["ms_fastest_step"] <= ours["ms_per_step"] * 2
    bad = run_script("bench_throughput.py", "--cpu_scan=fast", "--device=cpu")
    assert bad.returncode == 2 and "expected 'eager' or 'compiled'" in bad.stderr + bad.stdout


# ---------------------------------------------------------------------------------------------
# bench_multitrack_speed.py


def test_bench_multitrack_speed_reports_ratios_of_alternated_measurements():
    """The multi-track / baseline speed table on the CPU: training and decode rows for both models (the
    decode ones measured `decode_repeats` times in turn), the ratio of every metric and the op counts per
    decode step (the multi-track step dispatches more), as one JSON line."""
    import json

    r = run_script("bench_multitrack_speed.py", "--baseline=tiny", "--multitrack=tiny", "--device=cpu",
                   "--dtype=float32", "--batch_size=1", "--seq_len=16", "--train_steps=1", "--decode_tokens=4",
                   "--decode_batch=2", "--decode_repeats=2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    keys = {"params", "train tok/s", "decode tok/s (batch 1)", "decode tok/s (batch 2)", "aten ops per step"}
    assert set(result["rows"]["baseline"]) == keys == set(result["ratio"])
    assert all(v > 0 for row in result["rows"].values() for v in row.values())
    assert result["ratio"]["aten ops per step"] > 1 and result["config"]["decode_repeats"] == 2


# ---------------------------------------------------------------------------------------------
# decode_reads.py


def test_decode_reads_splits_the_step_into_weight_reads_and_the_rest():
    """The decode-step breakdown: the one-stream rate, the per-tensor sums, the step's products (and the
    packed library paths this build has), the step and the step without its products, for every round,
    with medians, as one JSON line."""
    import json

    r = run_script("decode_reads.py", "--preset=tiny", "--vocab_size=64", "--rounds=3", "--repeats=1",
                   "--tokens=2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["rounds"]) == 3 and {"stream", "sums", "products", "step_ms", "rest_ms"} <= set(result["median"])
    assert all(v > 0 for row in result["rounds"] for v in row.values())
    assert result["median"]["sums"] == sorted(row["sums"] for row in result["rounds"])[1]
    assert "| rest (the step without its products) |" in r.stdout
