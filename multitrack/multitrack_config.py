"""Configuration of the multi-track Mamba LM, its presets, and the parameter matching to the baseline.

`MultiTrackConfig` follows MambaConfig's field names where they mean the same thing. What is new:

    tracks                 G, the number of SSM tracks (3: scene, character, plot; 1: the ablation)
    track_names            names, fastest first, used in statistics and plots
    track_dt_min/max       per-track Δ initialisation range (log-uniform inside), fastest first
    dt_clamp_factor        0: Δ free (as Mamba). f > 0: Δ of track g clamped to [dt_min_g / f, dt_max_g * f]
    router                 "learned" (narrative router) | "uniform" (all tracks weight 1/G)
    narrative_signals      the router also sees the token-id signals of multitrack/narrative.py
    cross_track            per-position attention across the G track outputs (multitrack/cross_track.py)
    cross_heads, cross_head_dim   its size (q, k, v of cross_heads * cross_head_dim per track)
    router_aux_weight      weight of the router load-balancing loss returned by `aux_loss()`
    d_inner                0: derived. With `match_params`, the width (a multiple of 8 G; of G below
                           d_model 256) whose parameter count is closest to a MambaLMHeadModel with the
                           same d_model, n_layer, vocab, d_state, d_conv and `expand`; else expand * d_model.

With tracks == 1 there is nothing to route or attend across: the router and cross-track attention
are off (`use_router`, `use_cross` are derived), and the single track's Δ is drawn log-uniform over the
union of the track ranges, i.e. multi-timescale initialisation only.

Parameter count (tied embedding counted once; `count_params` is tested against the built model):
    V_pad D + D + n_layer [ D                                   block RMSNorm
                            + 2 Di D + Di d_conv + Di           in_proj, conv1d (+bias)
                            + Di (R + 2 G' N) + R Di + Di        x_proj (Δ, per-track B, C), dt_proj
                            + Di N + Di + Di D                   A_log, D, out_proj
                            + (D G + G) + F G                    router (hidden, bias) + narrative signals
                            + 4 Di H dh ]                        cross-track q, k, v and output
where Di = d_inner, G' = G (or 1 when tracks == 1), F = number of narrative features, H dh = cross size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mamba_lm.errors import UserError
from multitrack.narrative import N_FEATURES

ROUTER_MODES = ("learned", "uniform")


@dataclass
class MultiTrackConfig:
    """Hyperparameters of the multi-track LM. Shared names mean what they mean in MambaConfig."""

    d_model: int = 896                          # D, width of the residual stream (= the baseline's)
    n_layer: int = 16                           # number of blocks
    vocab_size: int = 50277                     # tokenizer vocabulary (GPT-NeoX: 50277)
    d_state: int = 16                           # N, SSM state size per channel
    d_conv: int = 4                             # width of the causal depthwise conv
    expand: int = 2                             # E of the parameter-matched baseline (and default width)
    d_inner: int = 0                            # 0: derived (see module docstring)
    match_params: bool = True                   # derive d_inner to match the Mamba baseline's size
    dt_rank: int | str = "auto"                 # R, rank of the Δ projection; "auto" = ceil(d_model / 16)
    tracks: int = 3                             # G, number of SSM tracks
    track_names: tuple = ("scene", "character", "plot")
    track_dt_min: tuple = (1e-2, 1e-3, 1e-4)    # Δ init lower bound per track (fastest first)
    track_dt_max: tuple = (1e-1, 1e-2, 1e-3)    # Δ init upper bound per track
    dt_init_floor: float = 1e-5                 # lower clamp of the initial Δ
    dt_clamp_factor: float = 0.0                # 0: no clamp; f: Δ_g in [dt_min_g / f, dt_max_g * f]
    router: str = "learned"                     # "learned" | "uniform"
    narrative_signals: bool = True              # router sees the token-id narrative signals
    cross_track: bool = True                    # per-position attention across tracks
    cross_heads: int = 4                        # heads of the cross-track attention
    cross_head_dim: int = 8                     # q/k/v size per head and track
    router_aux_weight: float = 0.01             # load-balancing loss weight (0: off)
    conv_bias: bool = True
    bias: bool = False                          # bias in in_proj / out_proj
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    # derived in __post_init__
    d_track: int = field(init=False)            # channels per track, d_inner / G
    use_router: bool = field(init=False)
    use_signals: bool = field(init=False)
    use_cross: bool = field(init=False)
    padded_vocab_size: int = field(init=False)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "tracks",
                     "cross_heads", "cross_head_dim", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"MultiTrackConfig.{name} must be a positive integer, got {value!r}")
        self.track_names = tuple(self.track_names)              # lists after a JSON round trip
        self.track_dt_min = tuple(float(v) for v in self.track_dt_min)
        self.track_dt_max = tuple(float(v) for v in self.track_dt_max)
        n = len(self.track_dt_min)
        if len(self.track_dt_max) != n or (self.tracks > 1 and n != self.tracks):
            raise UserError(f"track_dt_min/track_dt_max need one entry per track (tracks={self.tracks}), "
                            f"got {len(self.track_dt_min)} and {len(self.track_dt_max)} (train_multitrack.py: "
                            f"--track_dt=min:max,... with one range per track)")
        if any(not 0 < lo <= hi for lo, hi in zip(self.track_dt_min, self.track_dt_max)):
            raise UserError(f"each track needs 0 < dt_min <= dt_max, got {self.track_dt_min} / {self.track_dt_max}")
        if self.tracks > 1 and len(self.track_names) != self.tracks:
            self.track_names = tuple(f"track{g}" for g in range(self.tracks))
        if self.tracks == 1:
            self.track_names = ("single",)
        if self.router not in ROUTER_MODES:
            raise UserError(f"MultiTrackConfig.router must be one of {ROUTER_MODES}, got {self.router!r}")
        if self.dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        m = self.pad_vocab_size_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m
        self.use_router = self.tracks > 1 and self.router == "learned"
        self.use_signals = self.use_router and self.narrative_signals
        self.use_cross = self.tracks > 1 and self.cross_track
        if self.d_inner == 0:
            self.d_inner = matched_d_inner(self) if self.match_params else self.expand * self.d_model
        if self.d_inner % self.tracks:
            raise UserError(f"d_inner={self.d_inner} must be divisible by tracks={self.tracks}")
        self.d_track = self.d_inner // self.tracks

    @property
    def dt_ranges(self) -> list[tuple[float, float]]:
        """Δ init range of each track; one track spans the union of the configured ranges."""
        if self.tracks == 1:
            return [(min(self.track_dt_min), max(self.track_dt_max))]
        return list(zip(self.track_dt_min, self.track_dt_max))


def _layer_params(c, d_inner: int, tracks: int, use_router: bool, use_signals: bool, use_cross: bool) -> int:
    """Parameters of one block (see the module docstring)."""
    D, Di, N, R = c.d_model, d_inner, c.d_state, c.dt_rank
    groups = tracks if tracks > 1 else 1
    n = D                                                          # block norm
    n += 2 * Di * D + (2 * Di if c.bias else 0)                     # in_proj
    n += Di * c.d_conv + (Di if c.conv_bias else 0)                 # conv1d
    n += Di * (R + 2 * groups * N) + R * Di + Di                    # x_proj, dt_proj (+ bias)
    n += Di * N + Di                                                # A_log, D
    n += Di * D + (D if c.bias else 0)                              # out_proj
    if use_router:
        n += D * tracks + tracks + (N_FEATURES * tracks if use_signals else 0)
    if use_cross:
        n += 4 * Di * c.cross_heads * c.cross_head_dim
    return n


def count_params(c: MultiTrackConfig) -> int:
    """Parameters of MultiTrackLM(c), without building it."""
    embedding = c.padded_vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return embedding + c.d_model + c.n_layer * _layer_params(c, c.d_inner, c.tracks, c.use_router,
                                                             c.use_signals, c.use_cross)


def baseline_params(c: MultiTrackConfig) -> int:
    """Parameters of the Mamba baseline with c's shared dimensions (MambaLMHeadModel, expand = c.expand)."""
    embedding = c.padded_vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return embedding + c.d_model + c.n_layer * _layer_params(c, c.expand * c.d_model, 1, False, False, False)


def matched_d_inner(c: MultiTrackConfig) -> int:
    """The multiple of 8 G (of G below d_model 256, where a few channels are a large share) closest to
    giving c the baseline's parameter count (block params are linear in Di)."""
    align = 8 * c.tracks if c.d_model >= 256 else c.tracks
    per_layer_target = _layer_params(c, c.expand * c.d_model, 1, False, False, False)
    fixed = _layer_params(c, 0, c.tracks, c.use_router, c.use_signals, c.use_cross)
    per_channel = _layer_params(c, 1, c.tracks, c.use_router, c.use_signals, c.use_cross) - fixed
    d_inner = round((per_layer_target - fixed) / per_channel / align) * align
    return max(align, d_inner)


def _init_fields() -> set[str]:
    return {f.name for f in fields(MultiTrackConfig) if f.init}


# shared dimensions mirror mamba_lm.mamba.PRESETS of the same size; d_inner is derived to match
PRESETS: dict[str, dict] = {
    "multitrack-130m": dict(d_model=896, n_layer=16),                       # vs "mamba-130m" (126,924,672)
    "tiny": dict(d_model=64, n_layer=2, cross_heads=2, cross_head_dim=4),    # vs mamba "tiny"
    "small-cpu": dict(d_model=256, n_layer=4, cross_heads=2, cross_head_dim=8),  # vs mamba "small-cpu"
}


def multitrack_config(preset: str, **overrides) -> MultiTrackConfig:
    """The config of a preset with field overrides, e.g. multitrack_config("tiny", vocab_size=4096, tracks=1).

    d_inner is re-derived (parameter-matched) unless given explicitly, so ablation switches keep the
    parameter count equal to the baseline's.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown multitrack preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    unknown = set(overrides) - _init_fields()
    if unknown:
        raise UserError(f"unknown MultiTrackConfig field(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_init_fields()))}")
    return MultiTrackConfig(**{**PRESETS[preset], **overrides})
