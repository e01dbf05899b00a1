"""The multi-track Mamba LM: triple-track SSM mixers, a narrative-aware router, cross-track attention.

    ids (B, L) --embedding--> (B, L, D) --n_layer x MultiTrackBlock--> RMSNorm --tied lm_head--> (B, L, V_pad)
                 |
                 +--signal_table[ids]--> narrative features s (B, L, F) --> W_s s + b of every block's router,
                                                                           one matmul for all layers
                                                                       --> the plot clock's input per block
                                                                           (the boundary rule's gate, or
                                                                           w_s s + b of every layer's
                                                                           learned gate in one matmul)

Same model contract as mamba_lm.mamba.MambaLMHeadModel (CONTRACTS.md): forward(ids, cache=None),
allocate_cache, step, num_params, plus the router hooks the trainer uses: aux_loss(), reset_stats(),
stats(). State-dict names follow mamba-ssm where the part is the same (backbone.embedding,
backbone.layers.{i}.norm / .mixer.{in_proj,conv1d,x_proj,dt_proj,A_log,D,out_proj}, backbone.norm_f,
lm_head) plus backbone.layers.{i}.mixer.router.* / .cross.* and the buffer `signal_table`
(V_pad, len(SIGNAL_COLUMNS)) uint8: the narrative lookup table of the tokenizer the model was trained
with. It lives in the state dict, so `models.build_model("multitrack", config)` +
`load_state_dict(strict=True)` rebuilds a trained model from its checkpoint alone. A fresh model has
an all-zero table (no signals) until `set_signal_table(build_signal_tables(tokenizer))`.

Components, their reasons and the ablations: research_plan.md. Config: multitrack/multitrack_config.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.errors import UserError
from mamba_lm.mamba import MambaCache, init_lm_weights, kept
from mamba_lm.models import register_model_type
from multitrack.multitrack_config import (PRESETS, VARIANTS, MultiTrackConfig, baseline_params, count_params,
                                          multitrack_config, variant_config)
from multitrack.narrative import (SIGNAL_COLUMNS, TOKEN_TYPES, NarrativeState, narrative_entry, narrative_features,
                                  narrative_step, narrative_transitions)
from multitrack.plot_clock import boundary_gate
from multitrack.router import mean_balance_loss
from multitrack.triple_track import MultiTrackBlock

__all__ = ["MultiTrackConfig", "MultiTrackLM", "MultiTrackCache", "PRESETS", "VARIANTS", "multitrack_config",
           "variant_config", "count_params", "baseline_params", "parameter_report"]


# token types of the plot-clock statistics: the router's, plus the tokens where the boundary rule fires
CLOCK_TYPES = TOKEN_TYPES + ("boundary", "non_boundary")


class MultiTrackCache(MambaCache):
    """Recurrent state: per layer conv_states[i] (B, Di, d_conv), ssm_states[i] (B, Ds, N) float32, with
    the character memory mem_states[i] (B, H, d_k, d_v) float32 (an empty list without it), and the
    narrative state (dialogue parity, previous-token flags). Updated in place; `reset()` zeroes it."""

    def __init__(self, conv_states: list[torch.Tensor], ssm_states: list[torch.Tensor], narrative: NarrativeState,
                 mem_states: list[torch.Tensor] | None = None):
        super().__init__(conv_states, ssm_states)
        self.narrative = narrative
        self.mem_states = [] if mem_states is None else mem_states

    def reset(self) -> None:
        super().reset()
        for t in self.mem_states:
            t.zero_()
        self.narrative.reset()


class MultiTrackBackbone(nn.Module):
    """Embedding, n_layer MultiTrackBlocks, final RMSNorm. (B, L) ids + router signal terms -> (B, L, D), weights."""

    def __init__(self, config: MultiTrackConfig, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(MultiTrackBlock(config, i, device=device, dtype=dtype)
                                    for i in range(config.n_layer))
        self.norm_f = ops.RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)

    def forward(self, input_ids, signal_logits=None, cache=None, clock=None):
        """input_ids (B, L), signal_logits (B, L, n_layer, G) | None, clock: [(B, L) per layer] | None (the
        plot clock's inputs) -> (hidden (B, L, D), [router weights (B, L, G) | None per layer],
        [plot-clock gate (B, L) | None per layer])."""
        hidden_states, residual, all_weights, all_gates = self.embedding(input_ids), None, [], []
        # unbind, not signal_logits[:, :, i]: its backward is one stack, not a zero-filled copy per layer
        per_layer = [None] * len(self.layers) if signal_logits is None else signal_logits.unbind(2)
        clocks = [None] * len(self.layers) if clock is None else clock
        for layer, logits_i, clock_i in zip(self.layers, per_layer, clocks):
            hidden_states, residual, weights, gate = layer(hidden_states, residual, signal_logits=logits_i,
                                                           cache=cache, clock=clock_i)
            all_weights.append(weights)
            all_gates.append(gate)
        hidden_states = self.norm_f(hidden_states, residual=residual, prenorm=False,
                                    residual_in_fp32=self.residual_in_fp32)
        return hidden_states, all_weights, all_gates

    def step(self, input_ids, signal_logits, cache, clock=None):
        """input_ids (B,), signal_logits (B, n_layer, G) | None, clock [(B,) per layer] | None -> hidden (B, D)."""
        hidden_states, residual = self.embedding(input_ids), None
        for i, layer in enumerate(self.layers):
            logits_i = None if signal_logits is None else signal_logits[:, i]
            hidden_states, residual, _, _ = layer.step(hidden_states, residual, logits_i, cache,
                                                       None if clock is None else clock[i])
        return self.norm_f(hidden_states, residual=residual, prenorm=False,
                           residual_in_fp32=self.residual_in_fp32)


class MultiTrackLM(nn.Module):
    """Multi-track LM with tied LM head. forward: (B, L) ids -> (B, L, V_pad) logits."""

    model_type = "multitrack"

    def __init__(self, config: MultiTrackConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = MultiTrackBackbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.register_buffer("signal_table", torch.zeros(config.padded_vocab_size, len(SIGNAL_COLUMNS),
                                                         dtype=torch.uint8, device=device))
        # mamba-ssm's init (zero Linear biases except dt_proj, N(0, 0.02) embedding, out_proj rescaled by
        # 1/sqrt(n_layer)); the structure it walks (backbone.layers[i].mixer.out_proj) is the same here
        init_lm_weights(self, config.n_layer)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        # router statistics: "train" = accumulate in training-mode forwards only (so the trainer's val
        # passes do not mix into them), True = every forward, False = never; step() never records
        self.record_stats: bool | str = "train"
        self._aux: torch.Tensor | None = None
        self._warned_no_table = False
        self.reset_stats()
        ops.log_kernels_once()

    # ------------------------------------------------------------------------------------------
    def set_signal_table(self, table: torch.Tensor) -> None:
        """Install a narrative lookup table (vocab_size, len(SIGNAL_COLUMNS)) from build_signal_tables."""
        if table.dim() != 2 or table.shape[1] != len(SIGNAL_COLUMNS) or table.shape[0] > self.signal_table.shape[0]:
            raise UserError(f"signal table of shape {tuple(table.shape)} does not fit this model "
                            f"(vocab {self.config.vocab_size}, {len(SIGNAL_COLUMNS)} signal columns)")
        with torch.no_grad():
            self.signal_table.zero_()
            self.signal_table[: table.shape[0]].copy_(table.to(self.signal_table.device, torch.uint8))

    def _signal_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self._warned_no_table and (self.config.use_signals or self.config.use_plot_clock):
            self._warned_no_table = True
            if not bool(self.signal_table.any()):
                warnings.warn("MultiTrackLM: the narrative signal table is empty (fresh model?); call "
                              "model.set_signal_table(build_signal_tables(tokenizer)) so the router and the "
                              "plot clock see signals")
        return self.signal_table[input_ids]

    def forward(self, input_ids: torch.Tensor, cache: MultiTrackCache | None = None) -> torch.Tensor:
        """input_ids: (B, L) long -> logits (B, L, V_pad). With a cache: start from its state, leave the final one."""
        features, types, new_state = narrative_features(self._signal_rows(input_ids),
                                                        None if cache is None else cache.narrative)
        hidden_states, weights, gates = self.backbone(input_ids, self._router_signal_logits(features), cache,
                                                      self._clock_inputs(features))
        if cache is not None:
            cache.narrative.copy_(new_state)
        self._after_forward(weights, gates, types, features)
        return self.lm_head(hidden_states)

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MultiTrackCache:
        """Zero state for `batch_size` sequences; SSM states float32, conv states `dtype` (default: params')."""
        p = self.lm_head.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        c = self.config
        conv = [torch.zeros(batch_size, c.d_inner, c.d_conv, device=device, dtype=dtype) for _ in range(c.n_layer)]
        ssm = [torch.zeros(batch_size, c.d_scan, c.d_state, device=device, dtype=torch.float32)
               for _ in range(c.n_layer)]
        mem = [torch.zeros(batch_size, *layer.mixer.memory.state_shape(), device=device, dtype=torch.float32)
               for layer in self.backbone.layers if layer.mixer.memory is not None]
        return MultiTrackCache(conv, ssm, NarrativeState.zeros(batch_size, device=device), mem)

    def step(self, input_ids: torch.Tensor, cache: MultiTrackCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V_pad); O(1) time and memory; updates cache.

        Same result as forward (tested); written for few ops per token. Without autograd the narrative
        state machine is a table lookup (`narrative_entry`) and so are the routers' signal terms and the
        plot clock's inputs: both depend on the token only through its (row class, state) entry, so they
        are tabulated per entry and kept between tokens (`_step_tables`). With autograd on (BPTT through
        steps) or inside torch.compile: `narrative_step` and the terms as in forward.
        """
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            features = narrative_step(self.signal_table[input_ids], cache.narrative)   # (B, F)
            signal_logits, clock = self._router_signal_logits(features), self._clock_inputs(features)
        else:
            transitions, logits_of, clock_of = self._step_tables()
            entry = narrative_entry(input_ids, cache.narrative, transitions)            # (B,)
            signal_logits = None if logits_of is None else logits_of[entry]             # (B, n_layer, G)
            clock = None if clock_of is None else list(clock_of[entry].unbind(-1))      # [(B,) per layer]
        hidden_states = self.backbone.step(input_ids, signal_logits, cache, clock)
        return ops.linear_step(hidden_states, self.lm_head.weight)

    def _step_tables(self):
        """(NarrativeTransitions of the signal table, router signal terms per entry (K 8, n_layer, G) | None,
        plot-clock inputs per entry (K 8, n_layer) | None): the decode step's lookups, kept between tokens
        and rebuilt when the table or a weight they read changes (mamba.kept)."""
        weights = self.__dict__.get("_step_table_weights")
        # the parameters the tables read, listed once: in-place changes (optimizer steps, load_state_dict) keep
        # the objects, and load_state_dict(assign=True) also replaces the table buffer, which rebuilds them
        if weights is None:
            mixers = [layer.mixer for layer in self.backbone.layers]
            weights = self.__dict__["_step_table_weights"] = (
                [p for m in mixers if m.router is not None and m.router.signal_proj is not None
                 for p in (m.router.signal_proj.weight, m.router.proj.bias)]
                + [p for m in mixers if m.clock is not None for p in m.clock.signal_proj.parameters()])
        return kept(self, "_step_tables_kept", self._tabulate_step, self.signal_table, *weights)

    def _tabulate_step(self, table: torch.Tensor, *weights: torch.Tensor):
        transitions = narrative_transitions(table)
        logits_of = self._router_signal_logits(transitions.features)
        clock_of = self._clock_inputs(transitions.features)
        return transitions, logits_of, None if clock_of is None else torch.stack(clock_of, dim=-1)

    def _clock_inputs(self, features: torch.Tensor) -> list[torch.Tensor] | None:
        """The plot clock's input of every layer, features (..., F) -> [(...,) per layer] | None: the boundary
        rule's 0/1 gate (the same for every layer), or w_s s + b of every layer's learned gate in one matmul."""
        c = self.config
        if not c.use_plot_clock:
            return None
        if c.plot_clock == "signals":
            return [boundary_gate(features, c.plot_clock_signals)] * c.n_layer
        clocks = [layer.mixer.clock.signal_proj for layer in self.backbone.layers]
        w = kept(self, "_clock_w", _cat, *[p.weight for p in clocks])              # (n_layer, F)
        b = kept(self, "_clock_b", _cat, *[p.bias for p in clocks])                # (n_layer,)
        return list(F.linear(_cast(features, w.dtype), w, b).unbind(-1))

    def _router_signal_logits(self, features: torch.Tensor) -> torch.Tensor | None:
        """W_s s + b of every layer's router in one matmul: features (..., F) -> (..., n_layer, G), or None
        when the routers read no signals (each router then adds its own bias). Each layer's router is then
        one addmm (NarrativeRouter.forward), instead of two matmuls, an add and casts per layer."""
        if not self.config.use_signals:
            return None
        routers = [layer.mixer.router for layer in self.backbone.layers]
        # the stacked weights are kept between decode steps (mamba.kept), not concatenated every token
        w = kept(self, "_router_w", _cat, *[r.signal_proj.weight for r in routers])   # (n_layer G, F)
        b = kept(self, "_router_b", _cat, *[r.proj.bias for r in routers])            # (n_layer G,)
        return F.linear(_cast(features, w.dtype), w, b).unflatten(-1, (self.config.n_layer, -1))

    def num_params(self) -> int:
        """Number of unique parameters (the tied embedding / LM head counted once; buffers excluded)."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------
    # router hooks (CONTRACTS.md, trainer API)

    def _after_forward(self, weights: list, gates: list, types: torch.Tensor, features: torch.Tensor) -> None:
        self._aux = None
        c = self.config
        aux = self.training and torch.is_grad_enabled() and c.router_aux_weight > 0 and c.use_router
        record = self.record_stats is True or (self.record_stats == "train" and self.training)
        if aux or (record and c.use_router):
            stacked = torch.stack(weights)                                       # (n_layer, B, L, G) float32
            if aux:
                self._aux = c.router_aux_weight * mean_balance_loss(stacked)
            if record:
                self._stat_sums, self._stat_counts = _accumulate(
                    self._stat_sums, self._stat_counts, types, "blt,kblg->ktg", stacked)
        if record and c.use_plot_clock:
            boundary = boundary_gate(features, c.plot_clock_signals)[..., None] > 0
            clock_types = torch.cat([types, boundary, ~boundary], dim=-1)        # (B, L, len(CLOCK_TYPES))
            self._clock_sums, self._clock_counts = _accumulate(
                self._clock_sums, self._clock_counts, clock_types, "blt,kbl->kt", torch.stack(gates))

    def aux_loss(self) -> torch.Tensor | None:
        """router_aux_weight * mean over layers of the router balance loss of the last training forward."""
        return self._aux

    def reset_stats(self) -> None:
        """Forget the router and plot-clock statistics recorded so far."""
        self._stat_sums = None      # (n_layer, len(TOKEN_TYPES), G) float64: summed weights
        self._stat_counts = None    # (len(TOKEN_TYPES),) float64: tokens of each type
        self._clock_sums = None     # (n_layer, len(CLOCK_TYPES)) float64: summed plot-clock gates
        self._clock_counts = None   # (len(CLOCK_TYPES),) float64

    def stats(self) -> dict:
        """Router statistics of the recorded forwards since reset_stats() (by default training-mode
        forwards only, see `record_stats`; the trainer resets after each eval, so at `on_eval` they cover
        the training steps since the previous eval), as flat floats:

        router/<type>/<track>          mean weight of the track over tokens of that type, averaged over layers
                                       (types: TOKEN_TYPES; weights of the tracks sum to 1)
        router/layer<i>/<track>        mean weight per layer over all tokens
        router/frac/<type>             share of recorded tokens of that type
        router/tokens                  number of tokens recorded
        clock/<type>                   with a plot clock: its gate's mean (the open rate) over tokens of
                                       that type, averaged over layers (types: CLOCK_TYPES, i.e. also
                                       "boundary" / "non_boundary": where the boundary rule fires or not)
        clock/layer<i>                 the open rate per layer over all tokens
        clock/tokens                   number of tokens recorded
        Empty when nothing was recorded (uniform router and no clock, one track, or no eval forward yet).
        """
        return {**self._router_stats(), **self._clock_stats()}

    def _clock_stats(self) -> dict:
        if self._clock_sums is None or float(self._clock_counts[0]) == 0:
            return {}
        sums, counts = self._clock_sums.cpu(), self._clock_counts.cpu()
        out = {"clock/tokens": float(counts[0])}
        for ti, tname in enumerate(CLOCK_TYPES):
            if counts[ti] > 0:
                out[f"clock/{tname}"] = float(sums[:, ti].mean() / counts[ti])
        for k in range(sums.shape[0]):
            out[f"clock/layer{k}"] = float(sums[k, 0] / counts[0])
        return out

    def _router_stats(self) -> dict:
        if self._stat_sums is None or float(self._stat_counts[0]) == 0:
            return {}
        sums, counts = self._stat_sums.cpu(), self._stat_counts.cpu()
        names = self.config.track_names
        out = {"router/tokens": float(counts[0])}
        for ti, tname in enumerate(TOKEN_TYPES):
            out[f"router/frac/{tname}"] = float(counts[ti] / counts[0])
            if counts[ti] == 0:
                continue
            mean = sums[:, ti].mean(0) / counts[ti]                              # (G,)
            for g, track in enumerate(names):
                out[f"router/{tname}/{track}"] = float(mean[g])
        for k in range(sums.shape[0]):
            for g, track in enumerate(names):
                out[f"router/layer{k}/{track}"] = float(sums[k, 0, g] / counts[0])
        return out


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _accumulate(sums, counts, types: torch.Tensor, equation: str, values: torch.Tensor):
    """Add the per-type sums of `values` (einsum `equation` with types (B, L, T) bool) and the type counts
    to running float64 totals (None: start). Returns the new (sums, counts)."""
    with torch.no_grad():
        t = types.float()
        new = torch.einsum(equation, t, values.detach().float()).double()
        if sums is None or sums.device != new.device:
            sums = torch.zeros_like(new)
            counts = torch.zeros(t.shape[-1], dtype=torch.float64, device=new.device)
        return sums + new, counts + t.sum((0, 1))


def parameter_report(config: MultiTrackConfig) -> str:
    """One line: this model's parameter count (computed, not built) vs the matched Mamba baseline's."""
    n, base = count_params(config), baseline_params(config)
    extra = "".join([f", plot clock: {config.plot_clock}" if config.use_plot_clock else "",
                     f", character memory: {config.mem_heads} heads x d_k {config.mem_head_dim}"
                     if config.use_char_memory else ""])
    return (f"multitrack params {n:,} vs mamba baseline {base:,} ({100 * (n - base) / base:+.2f}%); "
            f"d_inner={config.d_inner} ({config.tracks} x {config.d_track}), baseline d_inner="
            f"{config.expand * config.d_model}{extra}")


register_model_type("multitrack", MultiTrackConfig, MultiTrackLM)  # build_model("multitrack", ...) from here on
