"""The Mamba language model (Gu & Dao 2023), parameter-compatible with mamba-ssm's MambaLMHeadModel.

Structure and names follow mamba-ssm (`mamba_simple.py` / `block.py` / `mixer_seq_simple.py`), so a
mamba-ssm checkpoint or a state-spaces/mamba-* folder loads with `strict=True`:

    backbone.embedding.weight                                 (V_pad, D)
    backbone.layers.{i}.norm.weight                           (D,)        pre-norm RMSNorm
    backbone.layers.{i}.mixer.in_proj.weight                  (2 E D, D)  -> x, z
    backbone.layers.{i}.mixer.conv1d.weight / .bias           (E D, 1, d_conv) / (E D,)
    backbone.layers.{i}.mixer.x_proj.weight                   (R + 2 N, E D)  -> Δ (rank R), B, C
    backbone.layers.{i}.mixer.dt_proj.weight / .bias          (E D, R) / (E D,)
    backbone.layers.{i}.mixer.A_log                           (E D, N)    A = -exp(A_log)
    backbone.layers.{i}.mixer.D                               (E D,)
    backbone.layers.{i}.mixer.out_proj.weight                 (D, E D)
    backbone.norm_f.weight                                    (D,)
    lm_head.weight                                            (V_pad, D)  tied to the embedding

Notation: B batch, L length, D = d_model, E = expand, E D = d_inner, N = d_state, R = dt_rank,
V_pad = vocab padded to a multiple of `pad_vocab_size_multiple`.

Each block is   residual = x + residual;  x = Mixer(RMSNorm(residual))   (the add fused into the norm,
residual kept in float32). `forward(ids, cache)` starts from the state in `cache` and leaves the final
state there, so a long sequence can be processed in chunks; `step(ids, cache)` is the O(1) recurrent
form used for generation. Both give the same logits as one parallel forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_lm import ops
from mamba_lm.errors import UserError


@dataclass
class MambaConfig:
    """Hyperparameters of a Mamba LM; field names follow mamba-ssm's MambaConfig + Mamba mixer."""

    d_model: int = 896                 # D, width of the residual stream
    n_layer: int = 16                  # number of Mamba blocks
    vocab_size: int = 50277            # tokenizer vocabulary (GPT-NeoX: 50277)
    d_state: int = 16                  # N, SSM state size per channel
    d_conv: int = 4                    # width of the causal depthwise conv
    expand: int = 2                    # E, d_inner = E * d_model
    dt_rank: int | str = "auto"        # R, rank of the Δ projection; "auto" = ceil(d_model / 16)
    dt_min: float = 0.001              # Δ initialised log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4        # lower clamp of the initial Δ
    conv_bias: bool = True             # bias in the causal conv
    bias: bool = False                 # bias in in_proj / out_proj
    rms_norm: bool = True              # RMSNorm (LayerNorm is not implemented here)
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True      # keep the residual stream in float32 under autocast
    pad_vocab_size_multiple: int = 8   # embedding rows padded to a multiple of this
    tie_embeddings: bool = True        # lm_head.weight is backbone.embedding.weight
    d_inner: int = field(init=False)
    padded_vocab_size: int = field(init=False)

    def __post_init__(self):
        if not self.rms_norm:
            raise UserError("MambaConfig(rms_norm=False): only RMSNorm is implemented; use rms_norm=True")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"MambaConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        self.d_inner = self.expand * self.d_model
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m


def _init_fields(cls) -> set[str]:
    return {f.name for f in fields(cls) if f.init}


PRESETS: dict[str, MambaConfig] = {
    # the repository's 130M baseline: 126,924,672 parameters with the 50,277-token NeoX vocabulary
    "mamba-130m": MambaConfig(d_model=896, n_layer=16),
    # the public state-spaces/mamba-130m (129,135,360 parameters)
    "mamba-130m-ssm": MambaConfig(d_model=768, n_layer=24),
    # CPU-sized models for tests, demos and benchmarks (pass vocab_size=tokenizer.vocab_size)
    "tiny": MambaConfig(d_model=64, n_layer=2),
    "small-cpu": MambaConfig(d_model=256, n_layer=4),
    # the size ladder between small-cpu and mamba-130m (plans/gpu-ladder.toml), ~x2-3 steps in non-embedding
    # parameters (the scaling axis; with NeoX the embedding dominates small models): 10.2M, 30.2M, 60.3M
    # non-embedding (35.9M, 68.8M, 99.0M in all with NeoX); widths multiples of 128, depth growing with width
    "ladder-10m": MambaConfig(d_model=512, n_layer=6),
    "ladder-30m": MambaConfig(d_model=768, n_layer=8),
    "ladder-60m": MambaConfig(d_model=768, n_layer=16),
}


def mamba_config(preset: str, **overrides) -> MambaConfig:
    """The config of a preset (see PRESETS) with field overrides, e.g. mamba_config("tiny", vocab_size=4096)."""
    if preset not in PRESETS:
        raise UserError(f"unknown Mamba preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unknown = set(overrides) - _init_fields(MambaConfig)
    if unknown:
        raise UserError(f"unknown MambaConfig field(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_init_fields(MambaConfig)))}")
    base = {k: getattr(PRESETS[preset], k) for k in _init_fields(MambaConfig)}
    if "d_model" in overrides and "dt_rank" not in overrides:
        base["dt_rank"] = "auto"  # re-derive the rank from the new width
    base.update(overrides)
    return MambaConfig(**base)


# ----------------------------------------------------------------------------------------------

class MambaCache:
    """Recurrent state of every layer: conv_states[i] (B, d_inner, d_conv), ssm_states[i] (B, d_inner, N).

    Without autograd (generation, evaluation) the tensors are updated in place (so CUDA graphs can
    capture `step`); `reset()` zeroes them. Under grad mode a forward *rebinds* the layer's entries to
    the new state tensors (`set_layer_state`), which carry the graph of the window: the old ones may be
    saved for backward and must not change. `detach_()` cuts that graph (truncated BPTT between
    optimizer steps) and `reset_rows_(rows)` zeroes chosen rows (a stream that starts afresh);
    mamba_lm/stateful.py runs a window with per-row resets on top of these. Both walk every tensor
    the cache holds (also a subclass's, e.g. the multi-track narrative state), so a new kind of state
    needs no new code here, only zero = "fresh start".
    """

    # whether the final state a forward leaves here is differentiated: False lets the scan return it
    # detached (on mamba_ssm's kernel: no read-out steps); set by stateful.forward_with_resets
    state_grad: bool = True

    def __init__(self, conv_states: list[torch.Tensor], ssm_states: list[torch.Tensor]):
        self.conv_states = conv_states
        self.ssm_states = ssm_states

    @property
    def batch_size(self) -> int:
        return self.conv_states[0].shape[0]

    def reset(self) -> None:
        """Zero every state tensor in place (also under grad mode: the contract of generation's CUDA graphs)."""
        self._map_state(torch.Tensor.zero_)

    def set_layer_state(self, layer_idx: int, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> None:
        """Store layer `layer_idx`'s new conv and SSM state (see `set_state`)."""
        self.set_state("conv_states", layer_idx, conv_state)
        self.set_state("ssm_states", layer_idx, ssm_state)

    def set_state(self, name: str, layer_idx: int, value: torch.Tensor) -> None:
        """Store `value` as getattr(self, name)[layer_idx]: in place without autograd, else rebinding (a
        copy in the old tensor's dtype; see the class doc). Any per-layer state list of a subclass."""
        states = getattr(self, name)
        if torch.is_grad_enabled():
            states[layer_idx] = value.to(states[layer_idx].dtype, copy=True)
        else:
            states[layer_idx].copy_(value)

    def detach_(self) -> None:
        """Drop the autograd graph behind every state tensor (values and storage unchanged)."""
        self._map_state(torch.Tensor.detach)

    def reset_rows_(self, rows: torch.Tensor) -> None:
        """Zero the state of the sequences where rows (B,) bool is True; the others keep theirs."""
        rows = rows.to(self.conv_states[0].device, torch.bool)
        mask = lambda t: rows.view(-1, *[1] * (t.dim() - 1))                   # noqa: E731, (B, 1, ...)
        if torch.is_grad_enabled():   # rebind: the old tensors may be saved for backward
            self._map_state(lambda t: t.masked_fill(mask(t), 0))
        else:
            self._map_state(lambda t: t.masked_fill_(mask(t), 0))

    def state_tensors(self) -> list[torch.Tensor]:
        """Every state tensor, in a fixed order (checkpoints: `load_state_tensors_` puts them back)."""
        found = []
        self._map_state(lambda t: found.append(t) or t)
        return found

    def load_state_tensors_(self, tensors: list[torch.Tensor]) -> None:
        """Copy `state_tensors()` of an equal cache (same model and batch size) into this one, in place."""
        mine = self.state_tensors()
        if len(tensors) != len(mine) or any(a.shape != b.shape for a, b in zip(mine, tensors)):
            raise ValueError("saved recurrent state does not fit this cache (other model or batch size)")
        with torch.no_grad():
            for a, b in zip(mine, tensors):
                a.copy_(b)

    def _map_state(self, fn) -> None:
        """state tensor <- fn(state tensor), for every tensor held by the cache (lists, nested objects)."""
        stack = [self]
        while stack:
            obj = stack.pop()
            for name, value in vars(obj).items():
                if isinstance(value, torch.Tensor):
                    setattr(obj, name, fn(value))
                elif isinstance(value, list):
                    value[:] = [fn(t) if isinstance(t, torch.Tensor) else t for t in value]
                elif hasattr(value, "__dict__"):
                    stack.append(value)


def kept(module: nn.Module, name: str, fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), kept on `module` under `name` between calls while autograd is off (the decode step)
    and recomputed only when one of the tensors changes (in-place update, load_state_dict, move): a
    quantity derived from parameters is then computed once, not once per token. With autograd on
    (training, BPTT through steps) it is computed fresh every call, and so inside torch.compile (a compiled
    step: the computation becomes part of the graph, whose inputs are the parameters themselves)."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or any(t.is_inference() for t in tensors)):                     # inference tensors: no version
        return fn(*tensors)
    key = tuple((t._version, t.data_ptr(), t.device) for t in tensors)
    entry = module.__dict__.get(name)
    if entry is None or entry[0] != key:
        entry = module.__dict__[name] = (key, fn(*tensors))
    return entry[1]


def _neg_exp(A_log: torch.Tensor) -> torch.Tensor:
    return -torch.exp(A_log.float())


def ssm_A(mixer: nn.Module) -> torch.Tensor:
    """A = -exp(mixer.A_log), (d_inner, N) float32, for a mixer's decode step: kept between tokens (`kept`)."""
    return kept(mixer, "_A_kept", _neg_exp, mixer.A_log)


class Mamba(nn.Module):
    """The Mamba mixer (selective SSM block). forward: (B, L, D) -> (B, L, D)."""

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c = config
        kw = {"device": device, "dtype": dtype}
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = c.d_inner, c.d_state, c.d_conv, c.dt_rank
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner, bias=c.bias, **kw)
        self.conv1d = nn.Conv1d(c.d_inner, c.d_inner, kernel_size=c.d_conv, groups=c.d_inner,
                                padding=c.d_conv - 1, bias=c.conv_bias, **kw)
        self.x_proj = nn.Linear(c.d_inner, c.dt_rank + 2 * c.d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(c.dt_rank, c.d_inner, bias=True, **kw)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias, **kw)
        # S4D-real initialisation A_n = -(n + 1), stored as log so that A stays negative
        A = torch.arange(1, c.d_state + 1, dtype=torch.float32, device=device).repeat(c.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))                                  # (d_inner, N), fp32
        self.D = nn.Parameter(torch.ones(c.d_inner, device=device))              # (d_inner,), fp32
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self._init_dt(c)

    @torch.no_grad()
    def _init_dt(self, c: MambaConfig) -> None:
        """Δ projection as mamba-ssm: weight U(-R^-0.5, R^-0.5); bias = softplus^-1(Δ0), Δ0 log-uniform."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner, device=self.dt_proj.bias.device)
                       * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))                               # inverse of softplus
        self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

    def _ssm_params(self, x):
        """x: (B, d_inner, L) after the conv -> Δ (B, d_inner, L), B, C (B, N, L)."""
        b, _, l = x.shape
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(b * l, -1))              # (B L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = ops.linear_channels_first(dt.view(b, l, -1), self.dt_proj.weight)   # (B, d_inner, L), bias later
        B = B.view(b, l, -1).transpose(1, 2).contiguous()                        # (B, N, L)
        C = C.view(b, l, -1).transpose(1, 2).contiguous()
        return dt, B, C

    def forward(self, hidden_states: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """hidden_states: (B, L, D) -> (B, L, D); with a cache, start from and update its layer state."""
        A = -torch.exp(self.A_log.float())                                       # (d_inner, N)
        xz = ops.linear_channels_first(hidden_states, self.in_proj.weight, self.in_proj.bias)  # (B, 2 d_inner, L)
        if cache is None and ops.fused_mamba_inner_available(xz):
            return ops.mamba_inner(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                   self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A,
                                   self.D.float(), self.dt_proj.bias.float())
        x, z = xz.chunk(2, dim=1)                                                # (B, d_inner, L) each
        conv_weight = self.conv1d.weight.squeeze(1)                              # (d_inner, d_conv)
        if cache is None:
            x = ops.causal_conv1d(x, conv_weight, self.conv1d.bias, activation="silu")
        else:
            conv_state = cache.conv_states[self.layer_idx]                       # (B, d_inner, d_conv)
            x_in = x
            x = ops.causal_conv1d(x, conv_weight, self.conv1d.bias, activation="silu",
                                  initial_states=conv_state[:, :, 1:])
            history = torch.cat([conv_state, x_in.to(conv_state.dtype)], dim=2)
            new_conv_state = history[:, :, history.shape[2] - self.d_conv:]     # last d_conv inputs
        dt, B, C = self._ssm_params(x)
        ssm_state = None if cache is None else cache.ssm_states[self.layer_idx]
        y = ops.selective_scan(x, dt, A, B, C, self.D.float(), z=z,
                               delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                               return_last_state=cache is not None, initial_state=ssm_state,
                               last_state_grad=None if cache is None or cache.state_grad else False)
        if cache is not None:
            y, last_state = y
            cache.set_layer_state(self.layer_idx, new_conv_state, last_state)
        return self.out_proj(y.transpose(1, 2))                                  # (B, L, D)

    def step(self, hidden_states: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One token: hidden_states (B, D) -> (B, D); updates the layer's conv and SSM state in place."""
        xz = ops.linear_step(hidden_states, self.in_proj.weight, self.in_proj.bias)  # (B, 2 d_inner)
        x, z = xz.chunk(2, dim=-1)
        x = ops.causal_conv1d_update(x, cache.conv_states[self.layer_idx], self.conv1d.weight.squeeze(1),
                                     self.conv1d.bias, activation="silu")       # (B, d_inner)
        dt, B, C = torch.split(ops.linear_step(x, self.x_proj.weight), [self.dt_rank, self.d_state, self.d_state],
                               dim=-1)
        if dt.dtype == torch.float32:   # Δ + Δ_bias in the projection (one addmm); exact in fp32
            dt, dt_bias = ops.linear_step(dt, self.dt_proj.weight, self.dt_proj.bias), None  # (B, d_inner)
        else:                           # bf16/fp16: the bias added in fp32, as the scan does
            dt, dt_bias = F.linear(dt, self.dt_proj.weight), self.dt_proj.bias
        y = ops.selective_state_update(cache.ssm_states[self.layer_idx], x, dt, ssm_A(self), B, C, self.D,
                                       z=z, dt_bias=dt_bias, dt_softplus=True)
        return ops.linear_step(y, self.out_proj.weight, self.out_proj.bias)



class Block(nn.Module):
    """Pre-norm residual block: residual = x + residual; x = mixer(norm(residual))."""

    def __init__(self, config: MambaConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = ops.RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
        self.mixer = Mamba(config, layer_idx, device=device, dtype=dtype)

    def forward(self, hidden_states, residual=None, cache=None):
        """hidden_states, residual: (B, L, D) -> (mixer output, new residual)."""
        normed, residual = self.norm(hidden_states, residual=residual, prenorm=True,
                                     residual_in_fp32=self.residual_in_fp32)
        return self.mixer(normed, cache=cache), residual

    def step(self, hidden_states, residual, cache):
        """hidden_states, residual: (B, D) -> (mixer output, new residual)."""
        normed, residual = self.norm(hidden_states, residual=residual, prenorm=True,
                                     residual_in_fp32=self.residual_in_fp32)
        return self.mixer.step(normed, cache), residual


class MixerModel(nn.Module):
    """Embedding, n_layer Blocks, final RMSNorm (mamba-ssm's MixerModel). (B, L) ids -> (B, L, D)."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(config, i, device=device, dtype=dtype) for i in range(config.n_layer))
        self.norm_f = ops.RMSNorm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)

    def forward(self, input_ids, cache=None):
        hidden_states, residual = self.embedding(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, cache=cache)
        return self.norm_f(hidden_states, residual=residual, prenorm=False,
                           residual_in_fp32=self.residual_in_fp32)

    def step(self, input_ids, cache):
        hidden_states, residual = self.embedding(input_ids), None              # (B, D)
        for layer in self.layers:
            hidden_states, residual = layer.step(hidden_states, residual, cache)
        return self.norm_f(hidden_states, residual=residual, prenorm=False,
                           residual_in_fp32=self.residual_in_fp32)


@torch.no_grad()
def init_lm_weights(model: nn.Module, n_layer: int) -> None:
    """mamba-ssm's `_init_weights` for any LM whose blocks are `model.backbone.layers[i].mixer.out_proj`:
    zero Linear biases (except dt_proj), N(0, 0.02) embedding, out_proj re-drawn with
    kaiming_uniform(a=sqrt(5)) and scaled by 1/sqrt(n_layer) (prenorm rescale)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for layer in model.backbone.layers:
        p = layer.mixer.out_proj.weight
        nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        p /= math.sqrt(n_layer)


class MambaLMHeadModel(nn.Module):
    """Mamba LM: MixerModel + tied LM head. forward: (B, L) ids -> (B, L, V_pad) logits."""

    model_type = "mamba"

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        init_lm_weights(self, config.n_layer)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        ops.log_kernels_once()

    def forward(self, input_ids: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """input_ids: (B, L) long -> logits (B, L, V_pad). With a cache: start from its state, leave the final one."""
        hidden_states = self.backbone(input_ids, cache=cache)
        return self.lm_head(hidden_states)

    def allocate_cache(self, batch_size: int, device=None, dtype=None) -> MambaCache:
        """Zero recurrent state for `batch_size` sequences. SSM states are float32; conv states use `dtype`
        (default: the parameters' dtype)."""
        p = self.lm_head.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        c = self.config
        conv = [torch.zeros(batch_size, c.d_inner, c.d_conv, device=device, dtype=dtype) for _ in range(c.n_layer)]
        ssm = [torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=torch.float32)
               for _ in range(c.n_layer)]
        return MambaCache(conv, ssm)

    def step(self, input_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V_pad); O(1) time and memory; updates cache."""
        return ops.linear_step(self.backbone.step(input_ids, cache), self.lm_head.weight)

    def num_params(self) -> int:
        """Number of unique parameters (the tied embedding / LM head counted once)."""
        return sum(p.numel() for p in self.parameters())
