"""The decode step through torch.compile (inductor's CPU code): the same logits as the eager step and as
the parallel forward, for the baseline and the multi-track model, and generate(compile=True) the same
tokens as the eager loop. Skipped where inductor cannot compile (no C++ compiler)."""

import warnings

import pytest
import torch

from mamba_lm import ops
from mamba_lm.generation import CompiledStep, generate
from mamba_lm.mamba import MambaLMHeadModel, mamba_config
from mamba_lm.tokenizer import load_tokenizer
from multitrack.multitrack_config import VARIANTS, multitrack_config
from multitrack.multitrack_model import MultiTrackLM
from multitrack.narrative import build_signal_tables


@pytest.fixture(scope="module", autouse=True)
def inductor_works():
    """Skip the module where inductor cannot build its C++ code here."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1, fullgraph=True)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - whatever stops inductor on this machine
        pytest.skip(f"torch.compile (inductor) unavailable here: {type(e).__name__}: {str(e)[:100]}")


def _baseline():
    torch.manual_seed(0)
    return MambaLMHeadModel(mamba_config("tiny", vocab_size=101)).eval()


def _multitrack(variant):
    torch.manual_seed(0)
    model = MultiTrackLM(multitrack_config("tiny", vocab_size=257, d_model=32, n_layer=2, **VARIANTS[variant]))
    model.set_signal_table(build_signal_tables(load_tokenizer("byte")))
    with torch.no_grad():   # the zero-initialised router / cross-track output: perturbed so they act
        for name, p in model.named_parameters():
            if "router" in name or name.endswith("cross.out"):
                p.normal_(std=0.3)
    return model.eval()


MODELS = {"baseline": _baseline, "multitrack": lambda: _multitrack("full"), "revised": lambda: _multitrack("revised")}


@pytest.mark.parametrize("name,opaque", [("baseline", False), ("baseline", True), ("multitrack", False),
                                         ("revised", True)])
def test_compiled_step_equals_eager_step_and_forward(monkeypatch, name, opaque):
    """Teacher-forced at batch 1: torch.compile(model.step) (one graph) gives the eager step's logits and the
    parallel forward's, and leaves the same recurrent state; the projections through ops.linear_step's
    blocked product (the CPU decode path of larger models), lowered by inductor or (opaque: the path of
    large weights) called as the custom op ops._linear_blocked_op."""
    monkeypatch.setattr(ops, "_STEP_MIN_WEIGHT", 0)
    monkeypatch.setattr(ops, "_STEP_OPAQUE_WEIGHT", 0 if opaque else 1 << 40)
    model = MODELS[name]()
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model.step, dynamic=False, fullgraph=True)
    with torch.no_grad():
        full = model(ids)
        eager_cache, compiled_cache = model.allocate_cache(1), model.allocate_cache(1)
        eager = torch.stack([model.step(ids[:, t], eager_cache) for t in range(ids.shape[1])], dim=1)
        fast = torch.stack([compiled(ids[:, t], compiled_cache) for t in range(ids.shape[1])], dim=1)
    torch.testing.assert_close(fast, eager, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)
    for a, b in zip(compiled_cache.state_tensors(), eager_cache.state_tensors()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generate_compiled_gives_the_eager_tokens():
    """generate(compile=True) on the CPU decodes through CompiledStep without falling back (no warning) and
    gives the greedy tokens of the eager loop."""
    model = _baseline()
    prompt = torch.tensor([[5, 7, 11]])
    eager = generate(model, prompt, 16, temperature=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = generate(model, prompt, 16, temperature=0.0, compile=True)
    assert not [w for w in caught if "decoding eagerly" in str(w.message)]      # no fallback to eager steps
    assert torch.equal(compiled, eager)


def test_compiled_step_falls_back_to_eager_with_a_warning():
    """A step that cannot be compiled as one graph warns once and decodes eagerly with the same result."""
    class Model:
        def step(self, ids, cache):
            print("a graph break")                          # fullgraph=True: dynamo refuses this call
            return ids.float() * 2

    step = CompiledStep(Model(), cache=None)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = step(torch.tensor([3]))
    assert out.tolist() == [6.0]
    assert step(torch.tensor([4])).tolist() == [8.0]
