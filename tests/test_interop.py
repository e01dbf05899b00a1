"""Interop with the Mamba ecosystem: Hugging Face / mamba-ssm folders load into our model and our
checkpoints export to folders that transformers loads unchanged (mamba_lm/convert.py, mamba_lm/weights.py, export.py).

Every folder is built inside the test from tiny models (d_model 32, 2 layers) and a BPE trained on a
few sentences; the reference logits come from transformers' own MambaForCausalLM.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mamba_lm.checkpoint import save_checkpoint  # noqa: E402
from mamba_lm.convert import MAMBA_SSM_CONFIG_KEYS, describe_folder, detect_layout, mamba_ssm_model  # noqa: E402
from mamba_lm.errors import UserError  # noqa: E402
from mamba_lm.mamba import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba_lm.tokenizer import load_tokenizer, train_demo_bpe  # noqa: E402
from mamba_lm.weights import (WeightsInfo, check_data_tokenizer, describe_weights, export_hf,  # noqa: E402
                              export_mamba_ssm, load_weights)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
TEXTS = [
    "It was a dark and stormy night; the rain fell in torrents.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "The captain looked at the map, and the map looked back at the captain.",
    "She opened the letter slowly, and read it twice before she spoke.",
] * 8


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on the spot with `tokenizers` (eos <|endoftext|> = 0)."""
    return train_demo_bpe(TEXTS, vocab_size=300)


def hf_tiny(vocab_size: int, seed: int = 0, tie: bool = True):
    """A tiny transformers MambaForCausalLM with random (non-default) weights."""
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8,
                                   conv_kernel=4, expand=2, tie_word_embeddings=tie)
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # move D, norms, biases away from their init constants
            p.add_(0.05 * torch.randn_like(p))
    return model


def our_tiny(vocab_size: int, seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, d_state=8, vocab_size=vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def repo_ckpt(path: Path, model, tok, model_type="mamba") -> Path:
    """A repo checkpoint in the CONTRACTS.md format."""
    save_checkpoint(path, {
        "model_type": model_type, "model_config": {k: v for k, v in vars(model.config).items()},
        "model": model.state_dict(), "optimizer": None,
        "train_config": {"lr": 3e-4, "batch_size": 4, "seq_len": 64},
        "tokenizer": tok.to_dict(), "data": {"dir": "data/demo", "fingerprint": "f" * 64, "seq_len": 64},
        "step": 120, "epoch": 1, "step_in_epoch": 20, "tokens_seen": 30720, "best_val_loss": 3.25,
        "metrics": {"val_loss": 3.25, "val_ppl": 25.79}, "rng": {}, "history": [], "script": "train_baseline.py",
    })
    return path


def ids_for(vocab_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (2, 11), generator=g)


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a.float() - b.float()).abs().max().item()
    print(f"max |logits diff| = {diff:.2e}")
    return diff


@pytest.mark.parametrize("tie", [True, False])
def test_hf_folder_loads_with_equal_logits(tmp_path, bpe, tie):
    """A transformers save_pretrained folder (+ tokenizer.json) loads into our model: same logits,
    tokenizer found, the real vocab size recovered from the padded HF embedding; tied (lm_head
    omitted from the file) and untied heads."""
    padded = -(-bpe.vocab_size // 8) * 8
    hf = hf_tiny(padded, tie=tie)
    assert (hf.lm_head.weight.data_ptr() == hf.backbone.embeddings.weight.data_ptr()) == tie
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(bpe.json, encoding="utf-8")
    assert detect_layout(tmp_path / "hf") == "hf"
    model, tok, info = load_weights(tmp_path / "hf")
    assert tok is not None and tok.sha256 == bpe.sha256 and info["tokenizer"]["sha256"] == bpe.sha256
    assert info["vocab_size"] == bpe.vocab_size and info["padded_vocab_size"] == padded
    assert model.config.d_model == 32 and model.config.d_state == 8 and model.config.tie_embeddings == tie
    x = ids_for(bpe.vocab_size)
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL


def test_hf_folder_without_tokenizer_keeps_padded_vocab(tmp_path):
    """Without a tokenizer the HF vocab size is the padded one (vocab_exact False), the tokenizer is
    reported missing, and check_data_tokenizer accepts a data vocab that pads to it and refuses others."""
    hf = hf_tiny(304)
    hf.save_pretrained(tmp_path / "hf")
    model, tok, info = load_weights(tmp_path / "hf")
    assert tok is None and info["tokenizer"] == "missing" and info["vocab_exact"] is False
    assert info["vocab_size"] == 304
    check_data_tokenizer(info, {"name": "x", "vocab_size": 301, "eos_id": 0, "sha256": "a"})
    with pytest.raises(UserError, match="has no tokenizer.*'demo-bpe-4096' \\(vocab 4096\\)"):
        check_data_tokenizer(info, {"name": "demo-bpe-4096", "vocab_size": 4096, "eos_id": 0, "sha256": "a"})


def test_mamba_ssm_folder_loads_with_equal_logits(tmp_path):
    """A state-spaces style folder (mamba-ssm config.json + torch.save'd state dict with
    backbone.embedding and lm_head) loads: logits equal the transformers model with the same weights."""
    hf = hf_tiny(56, seed=3)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    folder = tmp_path / "ssm"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}))
    assert detect_layout(folder) == "mamba_ssm"
    model, tok, info = load_weights(folder)
    assert tok is None and info["tokenizer"] == "missing" and info["vocab_exact"] is True
    assert (model.config.vocab_size, model.config.padded_vocab_size) == (50, 56)
    x = ids_for(50)
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) < TOL
    check_data_tokenizer(info, {"name": "neox", "vocab_size": 50, "eos_id": 0, "sha256": "a"})
    with pytest.raises(UserError, match="has no tokenizer"):
        check_data_tokenizer(info, {"name": "neox", "vocab_size": 51, "eos_id": 0, "sha256": "a"})
    with pytest.raises(UserError, match="vocab_size 50 but tokenizer 'byte' has 257 tokens"):
        load_weights(folder, tokenizer="byte")


def test_describe_folder_refuses_what_load_weights_refuses(tmp_path, bpe):
    """describe_folder (evaluate.py's check before any work) reports a folder's vocabulary like
    load_weights, and refuses a mamba-ssm folder whose tokenizer.json does not fit its vocab_size
    with load_weights's message, without reading the (here absent) weights."""
    folder = tmp_path / "ssm"
    export_mamba_ssm(our_tiny(bpe.vocab_size, seed=5), folder, tokenizer=bpe)
    info = describe_folder(folder)
    _, _, loaded = load_weights(folder)
    assert {k: info[k] for k in ("vocab_size", "padded_vocab_size", "vocab_exact", "tokenizer")} == \
        {k: loaded[k] for k in ("vocab_size", "padded_vocab_size", "vocab_exact", "tokenizer")}
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "vocab_size": bpe.vocab_size + 1}))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match=f"vocab_size {bpe.vocab_size + 1} but tokenizer"):
        describe_folder(folder)


def test_tokenizerless_folder_exports_with_given_tokenizer(tmp_path):
    """A state-spaces style folder (no tokenizer) re-exports to the HF layout with --tokenizer: the
    tokenizer is bundled, the logits are unchanged, and the HF config pads the vocab as mamba-ssm does."""
    ours = our_tiny(257, seed=7)
    folder = tmp_path / "ssm"
    export_mamba_ssm(ours, folder)
    assert not (folder / "tokenizer.json").exists()
    export_hf(folder, tmp_path / "hf", tokenizer="byte")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["vocab_size"] == 264 and cfg["eos_token_id"] == 256 and cfg["architectures"] == ["MambaForCausalLM"]
    assert "converted by mamba-narrative" in (tmp_path / "hf" / "README.md").read_text()
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = ids_for(257)
    with torch.no_grad():
        assert max_diff(hf(x).logits, ours(x)) < TOL


def test_export_hf_round_trip(tmp_path, bpe):
    """Our checkpoint -> export_hf -> MambaForCausalLM / AutoTokenizer.from_pretrained: no missing or
    unexpected weights, same logits, same token ids, a model card with the training facts."""
    ours = our_tiny(bpe.vocab_size)
    ckpt = repo_ckpt(tmp_path / "ckpt.pt", ours, bpe)
    written = export_hf(ckpt, tmp_path / "export")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(written)
    hf, loading = transformers.MambaForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    hf.eval()
    assert hf.lm_head.weight.data_ptr() == hf.backbone.embeddings.weight.data_ptr()  # tied
    x = ids_for(bpe.vocab_size)
    with torch.no_grad():
        assert max_diff(hf(x).logits, ours(x)) < TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    for text in ["The captain read the letter twice.", "  stormy\nnight — Ishmael!"]:
        assert hf_tok(text)["input_ids"] == bpe.encode(text)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == bpe.eos_id
    card = (tmp_path / "export" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- mamba" in card
    assert "30,720" in card and "3.2500" in card and "data/demo" in card and "| lr | `0.0003` |" in card
    # and back: the exported folder loads into our model with the tokenizer
    model, tok, info = load_weights(tmp_path / "export")
    assert info["layout"] == "hf" and tok.sha256 == bpe.sha256 and info["vocab_size"] == bpe.vocab_size
    with torch.no_grad():
        assert max_diff(model(x), ours(x)) < TOL


def test_export_hf_byte_tokenizer(tmp_path):
    """The byte tokenizer exports as a tokenizer.json that AutoTokenizer encodes to the same ids (bytes)."""
    byte = load_tokenizer("byte")
    export_hf(our_tiny(byte.vocab_size), tmp_path / "export", tokenizer=byte, info={"step": 1})
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "Héllo, wörld!\n\tdone"
    assert hf_tok(text)["input_ids"] == byte.encode(text)
    assert hf_tok.decode(byte.encode(text)) == text and hf_tok.eos_token_id == 256


def test_export_mamba_ssm_round_trip(tmp_path, bpe):
    """export_mamba_ssm writes exactly mamba-ssm's config keys + a strict-loadable state dict (tied
    lm_head included); load_weights of it gives our logits back."""
    ours = our_tiny(bpe.vocab_size, seed=5)
    ckpt = repo_ckpt(tmp_path / "ckpt.pt", ours, bpe)
    export_mamba_ssm(ckpt, tmp_path / "ssm")
    cfg = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert set(cfg) == set(MAMBA_SSM_CONFIG_KEYS)
    assert cfg["ssm_cfg"] == {"d_state": 8} and cfg["vocab_size"] == bpe.vocab_size
    state = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(ours.state_dict()) and "lm_head.weight" in state
    model, tok, info = load_weights(tmp_path / "ssm")
    assert info["layout"] == "mamba_ssm" and tok.sha256 == bpe.sha256
    x = ids_for(bpe.vocab_size)
    with torch.no_grad():
        assert max_diff(model(x), ours(x)) < TOL


def test_broken_folders_are_user_errors(tmp_path, bpe):
    """Garbage weights, a truncated safetensors or torch .bin file, a missing weights file, and a config.json
    that does not fit the weights each give a short one-line UserError naming the file and the problem."""
    hf_tiny(304).save_pretrained(tmp_path / "good")
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    config = (tmp_path / "good" / "config.json").read_text()
    import io

    from safetensors.torch import load_file
    buffer = io.BytesIO()
    torch.save(load_file(str(tmp_path / "good" / "model.safetensors")), buffer)   # a real torch zip file
    bin_bytes = buffer.getvalue()

    def folder(name, weight_bytes=weights, config_text=config, weight_name="model.safetensors"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config_text)
        if weight_bytes is not None:
            (d / weight_name).write_bytes(weight_bytes)
        return d

    cases = {
        "garbage": (folder("garbage", b"\x89not a safetensors file at all" * 40), "corrupted or truncated"),
        "truncated": (folder("truncated", weights[: len(weights) // 2]), "corrupted or truncated"),
        "garbage_bin": (folder("garbage_bin", b"PK\x03\x04 garbage" * 50, weight_name="pytorch_model.bin"),
                        "corrupted or truncated"),
        "truncated_bin": (folder("truncated_bin", bin_bytes[: len(bin_bytes) - 3000], weight_name="pytorch_model.bin"),
                          "corrupted or truncated"),
        "no_weights": (folder("no_weights", None), "no weights"),
        "mismatch": (folder("mismatch", config_text=config.replace('"hidden_size": 32', '"hidden_size": 48')),
                     "does not match"),
        "fewer_layers": (folder("fewer_layers", config_text=config.replace('"num_hidden_layers": 2',
                                                                           '"num_hidden_layers": 1')),
                         "unexpected"),
    }
    for name, (path, expected) in cases.items():
        with pytest.raises(UserError) as e:
            load_weights(path)
        msg = str(e.value)
        assert expected in msg and "\n" not in msg and len(msg) < 400, (name, msg)
        assert str(path) in msg, (name, msg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_weights(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "missing")


def test_multitrack_export_refused(tmp_path, bpe):
    """Only baseline checkpoints export: a multitrack checkpoint is refused before anything is written."""
    ckpt = repo_ckpt(tmp_path / "mt.pt", our_tiny(bpe.vocab_size), bpe, model_type="multitrack")
    for export in (export_hf, export_mamba_ssm):
        with pytest.raises(UserError, match="only the baseline Mamba"):
            export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_export(*args):
    return subprocess.run([sys.executable, str(REPO / "export.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_export_script_writes_and_refuses_overwrite(tmp_path, bpe):
    """export.py writes both layouts atomically (no tmp folder left), then refuses a non-empty --out
    without --overwrite=True (exit 2, one line, old files intact) and replaces it with it."""
    ckpt = repo_ckpt(tmp_path / "ckpt.pt", our_tiny(bpe.vocab_size), bpe)
    out = tmp_path / "exports" / "tiny"
    r = run_export(f"--ckpt={ckpt}", f"--out={out}", "--format=both")
    assert r.returncode == 0, r.stderr
    assert (out / "hf" / "model.safetensors").is_file() and (out / "mamba_ssm" / "pytorch_model.bin").is_file()
    assert "MambaForCausalLM.from_pretrained" in r.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    r = run_export(f"--ckpt={ckpt}", f"--out={out}")
    assert r.returncode == 2 and "not empty" in r.stderr and "--overwrite=True" in r.stderr
    assert "Traceback" not in r.stderr and (out / "mamba_ssm" / "pytorch_model.bin").is_file()
    r = run_export(f"--ckpt={ckpt}", f"--out={out}", "--overwrite=True")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and not (out / "mamba_ssm").exists()
    assert 'MambaForCausalLM.from_pretrained("tiny")' in (out / "README.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_init_from_folders_fine_tunes_and_refuses_mismatch(tmp_path, demo_data_dir, train_config, bpe):
    """--init_from=<folder>: training starts from the folder's weights (lr 0 leaves them unchanged in
    the checkpoint) of a tokenizer-less mamba-ssm folder accepted on vocab size; an exported byte
    tokenizer comes back as the byte tokenizer (matches byte-level data); a folder whose tokenizer or
    vocab differs from the data's is refused."""
    from mamba_lm.data import check_tokenizer_match, load_meta
    from mamba_lm.trainer import train

    pretrained = our_tiny(257, seed=11)
    export_mamba_ssm(pretrained, tmp_path / "ssm")
    assert not (tmp_path / "ssm" / "tokenizer.json").exists()
    def never():
        """The script's builder: only probed on the meta device (model type), never used for the weights."""
        if torch.empty(0).device.type != "meta":
            pytest.fail("build_model must not build the real model when init_from is a folder")
        return our_tiny(257)
    cfg = train_config(demo_data_dir, tmp_path / "out", init_from=str(tmp_path / "ssm"), lr=0.0,
                       min_lr=0.0, max_steps=2, eval_interval=2, eval_max_batches=2)
    train(cfg, never, script="train_baseline.py")
    ckpt = torch.load(tmp_path / "out" / "ckpt_latest.pt", weights_only=True)
    assert ckpt["tokenizer"]["sha256"] == "byte-v1"
    for key, value in pretrained.state_dict().items():
        assert torch.equal(ckpt["model"][key], value), key

    export_hf(pretrained, tmp_path / "hf", tokenizer=load_tokenizer("byte"))
    _, tok, info = load_weights(tmp_path / "hf")
    assert tok.kind == "byte" and info["tokenizer"]["sha256"] == "byte-v1"
    check_tokenizer_match(load_meta(demo_data_dir)["tokenizer"], info["tokenizer"])

    export_hf(our_tiny(bpe.vocab_size), tmp_path / "hf_bpe", tokenizer=bpe)
    with pytest.raises(UserError, match="tokenizer mismatch"):
        train(train_config(demo_data_dir, tmp_path / "out_bpe", init_from=str(tmp_path / "hf_bpe")),
              never, script="train_baseline.py")
    export_mamba_ssm(our_tiny(300), tmp_path / "ssm300")
    with pytest.raises(UserError, match="has no tokenizer and a vocabulary of 300.*'byte' \\(vocab 257\\)"):
        train(train_config(demo_data_dir, tmp_path / "out_300", init_from=str(tmp_path / "ssm300")),
              never, script="train_baseline.py")


def test_init_from_refuses_a_model_of_another_type(tmp_path, demo_data_dir, train_config):
    """train_multitrack.py --init_from=<a Mamba folder> is refused up front with one line, instead of
    training a plain Mamba and failing in the multitrack hooks at the end."""
    from multitrack.multitrack_config import multitrack_config
    from mamba_lm.models import build_model
    from mamba_lm.trainer import train

    export_mamba_ssm(our_tiny(257, seed=3), tmp_path / "ssm")
    build_multitrack = lambda: build_model("multitrack", multitrack_config("tiny", vocab_size=257))  # noqa: E731
    with pytest.raises(UserError, match="holds a 'mamba' model, but train_multitrack.py trains 'multitrack'"):
        train(train_config(demo_data_dir, tmp_path / "out", init_from=str(tmp_path / "ssm")), build_multitrack,
              script="train_multitrack.py")
    assert not (tmp_path / "out" / "ckpt_latest.pt").exists()


MAMBA_SSM_SDIST = REPO / ".sdist" / "mamba_ssm-2.3.2.post1.tar.gz"


def import_mamba_ssm_from_sdist(tmp_path, monkeypatch):
    """mamba-ssm's own Python (config_mamba, mixer_seq_simple, mamba_simple, block, mlp, utils/hf) from the
    sdist that setup.sh builds on GPU machines, with its CUDA / triton kernel modules stubbed out: enough to
    run its from_pretrained / save_pretrained on CPU (building the model, strict load), not its forward."""
    import tarfile
    import types

    root = tmp_path / "mamba_ssm_src"
    wanted = ["models/config_mamba.py", "models/mixer_seq_simple.py", "modules/mamba_simple.py", "modules/block.py",
              "modules/mlp.py", "utils/hf.py"]
    with tarfile.open(MAMBA_SSM_SDIST) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/mamba_ssm/", 1)[-1]
            if member.name.count("/mamba_ssm/") and rel in wanted:
                member.name = rel
                tar.extract(member, root, filter="data")
    assert all((root / w).is_file() for w in wanted)

    def module(name, path=None, **attrs):
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [str(path)]
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)

    class RMSNorm(torch.nn.Module):  # the triton RMSNorm's parameters, without the kernel
        def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
            super().__init__()
            self.eps = eps
            self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            self.register_parameter("bias", None)

    for pkg, sub in (("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton"),
                     ("mamba_ssm.models", "models"), ("mamba_ssm.modules", "modules"), ("mamba_ssm.utils", "utils")):
        module(pkg, root / sub)
    def kernel(*args, **kwargs):
        raise NotImplementedError("triton kernel stub")

    module("mamba_ssm.ops.triton.layer_norm", RMSNorm=RMSNorm, layer_norm_fn=kernel, rms_norm_fn=kernel)
    module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=None, mamba_inner_fn=None)
    module("mamba_ssm.ops.triton.selective_state_update", selective_state_update=None)
    module("mamba_ssm.modules.mamba2", Mamba2=type("Mamba2", (), {}))
    module("mamba_ssm.modules.mha", MHA=type("MHA", (), {}))
    module("mamba_ssm.utils.generation", GenerationMixin=type("GenerationMixin", (), {}))
    for name in [n for n in sys.modules if n.startswith("mamba_ssm.") and n not in (
            "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.models", "mamba_ssm.modules", "mamba_ssm.utils",
            "mamba_ssm.ops.triton.layer_norm", "mamba_ssm.ops.selective_scan_interface",
            "mamba_ssm.ops.triton.selective_state_update", "mamba_ssm.modules.mamba2", "mamba_ssm.modules.mha",
            "mamba_ssm.utils.generation")]:
        monkeypatch.delitem(sys.modules, name)
    import importlib
    before = set(sys.modules)
    mixer_seq_simple = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
    for name in set(sys.modules) - before:           # forget the sdist's modules when the test ends
        monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    return mixer_seq_simple


@pytest.mark.skipif(not MAMBA_SSM_SDIST.is_file(), reason="needs the mamba-ssm sdist in .sdist/ (setup.sh)")
def test_mamba_ssm_own_from_pretrained_reads_the_export(tmp_path, monkeypatch, bpe):
    """mamba-ssm 2.3.2's own MambaLMHeadModel.from_pretrained (its load_config_hf / load_state_dict_hf,
    MambaConfig(**config.json), strict load_state_dict) reads an export_mamba_ssm folder with every tensor
    equal; and a folder written by its save_pretrained loads back into our model with the same logits."""
    mixer_seq_simple = import_mamba_ssm_from_sdist(tmp_path, monkeypatch)
    ours = our_tiny(bpe.vocab_size, seed=4)
    export_mamba_ssm(ours, tmp_path / "ssm", tokenizer=bpe)
    theirs = mixer_seq_simple.MambaLMHeadModel.from_pretrained(str(tmp_path / "ssm"))
    assert theirs.lm_head.weight.data_ptr() == theirs.backbone.embedding.weight.data_ptr()   # tied
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
    theirs.save_pretrained(str(tmp_path / "resaved"))
    model, tok, info = load_weights(tmp_path / "resaved")
    assert info["layout"] == "mamba_ssm" and tok is None
    x = ids_for(bpe.vocab_size)
    with torch.no_grad():
        assert max_diff(model(x), ours(x)) == 0.0


def test_half_precision_folders_load_as_float32(tmp_path):
    """Folders stored in bfloat16 (transformers save_pretrained) or float16 (a mamba-ssm state dict) load
    into a float32 model with the stored values exactly (reported as info["stored_dtype"])."""
    hf = hf_tiny(56, seed=2).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf_bf16")
    model, _, info = load_weights(tmp_path / "hf_bf16")
    assert info["stored_dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.float32
    assert torch.equal(model.backbone.embedding.weight, hf.backbone.embeddings.weight.float())

    ours = our_tiny(50, seed=6)
    export_mamba_ssm(ours, tmp_path / "ssm")
    state = torch.load(tmp_path / "ssm" / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.half() for k, v in state.items()}, tmp_path / "ssm" / "pytorch_model.bin")
    model, _, info = load_weights(tmp_path / "ssm")
    assert info["stored_dtype"] == "float16" and next(model.parameters()).dtype == torch.float32
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key].half().float()), key


@pytest.mark.skipif(not MAMBA_SSM_SDIST.is_file(), reason="needs the mamba-ssm sdist in .sdist/ (setup.sh)")
def test_mamba_ssm_model_takes_our_weights_unchanged(tmp_path, monkeypatch):
    """convert.mamba_ssm_model (the reference model of test_mamba.py, tests/test_gpu.py and the benches)
    builds mamba-ssm's own MambaLMHeadModel with our shapes: our state_dict loads strictly, every tensor
    the same shape, the embedding tied to the head; fused_add_norm follows the device unless given."""

    import_mamba_ssm_from_sdist(tmp_path, monkeypatch)
    ours = our_tiny(61, seed=5)
    theirs = mamba_ssm_model(ours.config)
    assert theirs.config.fused_add_norm is False
    assert mamba_ssm_model(ours.config, fused_add_norm=True).config.fused_add_norm is True
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert theirs.lm_head.weight.data_ptr() == theirs.backbone.embedding.weight.data_ptr()


def test_weights_info_is_one_shape_for_the_three_forms(tmp_path, bpe):
    """load_weights returns a WeightsInfo for a repo .pt, an HF folder and a mamba-ssm folder (same model:
    same parameter count, logits and tokenizer), with the repo-only facts (step, data fingerprint) where
    known; describe_weights, which reads no tensor, reports the same vocabulary and tokenizer."""
    model = our_tiny(bpe.vocab_size, seed=4)
    ckpt = repo_ckpt(tmp_path / "a.pt", model, bpe)
    export_hf(ckpt, tmp_path / "hf")
    export_mamba_ssm(ckpt, tmp_path / "ssm")
    ids = torch.tensor([bpe.encode(TEXTS[0])])
    for path, layout in ((ckpt, "repo"), (tmp_path / "hf", "hf"), (tmp_path / "ssm", "mamba_ssm")):
        loaded, tok, info = load_weights(path)
        assert isinstance(info, WeightsInfo) and info.layout == layout and info.model_type == "mamba"
        assert info.num_params == model.num_params() and tok.sha256 == bpe.sha256
        with torch.no_grad():
            assert torch.allclose(loaded(ids), model(ids), atol=TOL)
        described = describe_weights(path)
        assert described.num_params is None and described.layout == layout
        assert (described.vocab_size, described.padded_vocab_size, described.tokenizer) == \
            (info.vocab_size, info.padded_vocab_size, info.tokenizer)
        if layout == "repo":
            assert info.step == 120 and info.data_fingerprint == "f" * 64 and info["script"] == "train_baseline.py"
        else:
            assert info.step is None and info.data_fingerprint is None and info.get("step", "none") == "none"
