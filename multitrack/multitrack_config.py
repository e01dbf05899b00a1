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
    plot_clock             "off" | "signals" | "learned": the plot track (the slowest, last) decays and is
                           written only at narrative boundaries (multitrack/plot_clock.py); "signals": the
                           boundary rule g_t = any(plot_clock_signals at t); "learned": g_t = σ(w·[s_t, u_t] + b)
                           per layer, initialised near that rule
    plot_clock_signals     narrative features (multitrack/narrative.py FEATURE_NAMES) that open the clock
    plot_clock_dt_min/max  Δ init range of a clocked plot track, per boundary step (it replaces the
                           track's per-token range: 10-100 boundaries, i.e. paragraphs)
    char_memory            the character track (the second) runs a gated delta-rule key-value memory
                           (multitrack/delta_rule.py) instead of a selective scan
    mem_heads, mem_head_dim   its heads H and key size d_k per head; value size d_track / H
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
With `char_memory` the scan covers Ds = Di - d_track channels (G' = G - 1 groups of B, C; A_log, D,
dt_proj over Ds) and the memory track adds d_track (2 H d_k + 2 H) (q, k, α, β projection from its
channels) + 2 H (its A_log, Δ bias) + d_track (gated RMSNorm weight). A learned plot clock adds
D + F + 1 (w_u, w_s, b).

Variants: `VARIANTS` names every model variant and ablation with its config overrides (the tests and
the carried-state tests iterate over it); `train_multitrack.py` flags for each are in research_plan.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from mamba_lm.errors import UserError
from multitrack.narrative import FEATURE_NAMES, N_FEATURES

ROUTER_MODES = ("learned", "uniform")
CLOCK_MODES = ("off", "signals", "learned")


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
    plot_clock: str = "off"                     # "off" | "signals" | "learned": plot track written at boundaries only
    plot_clock_signals: tuple = ("paragraph_break", "heading", "scene_mark")  # features that open the clock
    plot_clock_dt_min: float = 1e-2             # Δ init range of the clocked plot track, per boundary
    plot_clock_dt_max: float = 1e-1
    char_memory: bool = False                   # character track = gated delta-rule memory, not a scan
    mem_heads: int = 4                          # H, heads of the delta-rule memory
    mem_head_dim: int = 32                      # d_k, key/query size per head
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
    use_plot_clock: bool = field(init=False)    # plot_clock != "off" and tracks > 1
    use_char_memory: bool = field(init=False)   # char_memory and tracks > 1
    plot_track: int = field(init=False)         # index of the clocked track: the slowest (last)
    memory_track: int = field(init=False)       # index of the delta-rule track: the second ("character")
    padded_vocab_size: int = field(init=False)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "tracks",
                     "cross_heads", "cross_head_dim", "pad_vocab_size_multiple", "mem_heads", "mem_head_dim"):
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
        self._check_new_mechanisms()
        if self.d_inner == 0:
            self.d_inner = matched_d_inner(self) if self.match_params else self.expand * self.d_model
        if self.d_inner % self.tracks:
            raise UserError(f"d_inner={self.d_inner} must be divisible by tracks={self.tracks}")
        self.d_track = self.d_inner // self.tracks
        if self.use_char_memory and self.d_track % self.mem_heads:
            raise UserError(f"d_track={self.d_track} must be divisible by mem_heads={self.mem_heads} "
                            f"(choose d_inner as a multiple of tracks * mem_heads, or d_inner=0)")

    def _check_new_mechanisms(self) -> None:
        """Validate and derive the plot clock and the character memory (both off with one track)."""
        if self.plot_clock not in CLOCK_MODES:
            raise UserError(f"MultiTrackConfig.plot_clock must be one of {CLOCK_MODES}, got {self.plot_clock!r}")
        if isinstance(self.plot_clock_signals, str):                # "a,b" from the command line
            self.plot_clock_signals = tuple(v for v in self.plot_clock_signals.split(",") if v)
        self.plot_clock_signals = tuple(self.plot_clock_signals)
        unknown = [v for v in self.plot_clock_signals if v not in FEATURE_NAMES]
        if unknown or not self.plot_clock_signals:
            raise UserError(f"plot_clock_signals must name narrative features from {FEATURE_NAMES}, got "
                            f"{self.plot_clock_signals!r}")
        if not 0 < self.plot_clock_dt_min <= self.plot_clock_dt_max:
            raise UserError(f"plot clock Δ range needs 0 < plot_clock_dt_min <= plot_clock_dt_max, got "
                            f"{self.plot_clock_dt_min} / {self.plot_clock_dt_max}")
        self.use_plot_clock = self.tracks > 1 and self.plot_clock != "off"
        self.use_char_memory = self.tracks > 1 and bool(self.char_memory)
        self.plot_track, self.memory_track = self.tracks - 1, min(1, self.tracks - 1)
        if self.use_plot_clock and self.use_char_memory and self.plot_track == self.memory_track:
            raise UserError(f"plot_clock and char_memory need different tracks: use tracks=3 "
                            f"(got tracks={self.tracks})")

    @property
    def dt_ranges(self) -> list[tuple[float, float]]:
        """Δ init range of each track; one track spans the union of the configured ranges; a clocked
        plot track has its per-boundary range."""
        if self.tracks == 1:
            return [(min(self.track_dt_min), max(self.track_dt_max))]
        ranges = list(zip(self.track_dt_min, self.track_dt_max))
        if self.use_plot_clock:
            ranges[self.plot_track] = (self.plot_clock_dt_min, self.plot_clock_dt_max)
        return ranges

    @property
    def scan_tracks(self) -> list[int]:
        """Indices of the tracks the selective scan runs (all but the delta-rule memory track), in order."""
        return [g for g in range(self.tracks) if not (self.use_char_memory and g == self.memory_track)]

    @property
    def d_scan(self) -> int:
        """Channels of the selective scan (Ds): d_inner, less the memory track's."""
        return self.d_track * len(self.scan_tracks)


def _layer_params(c, d_inner: float, baseline: bool = False) -> float:
    """Parameters of one block (see the module docstring), linear in d_inner. `baseline`: the Mamba
    block (one track, no router, cross-track, clock or memory) with the same shared dimensions."""
    D, Di, N, R, F_ = c.d_model, d_inner, c.d_state, c.dt_rank, N_FEATURES
    tracks = 1 if baseline else c.tracks
    memory = not baseline and c.use_char_memory
    d_track = Di / tracks
    d_scan = Di - d_track if memory else Di
    groups = 1 if tracks == 1 else tracks - int(memory)                 # B/C groups of the scan
    n = D                                                              # block norm
    n += 2 * Di * D + (2 * Di if c.bias else 0)                         # in_proj
    n += Di * c.d_conv + (Di if c.conv_bias else 0)                     # conv1d
    n += Di * (R + 2 * groups * N) + R * d_scan + d_scan                # x_proj, dt_proj (+ bias)
    n += d_scan * N + d_scan                                            # A_log, D
    n += Di * D + (D if c.bias else 0)                                  # out_proj
    if baseline:
        return n
    if c.use_router:
        n += D * tracks + tracks + (F_ * tracks if c.use_signals else 0)
    if c.use_cross:
        n += 4 * Di * c.cross_heads * c.cross_head_dim
    if memory:
        H = c.mem_heads
        n += d_track * (2 * H * c.mem_head_dim + 2 * H) + 2 * H + d_track  # q/k/α/β proj, A_log, Δ bias, norm
    if c.use_plot_clock and c.plot_clock == "learned":
        n += D + F_ + 1                                                  # w_u, w_s, b
    return n


def count_params(c: MultiTrackConfig) -> int:
    """Parameters of MultiTrackLM(c), without building it."""
    embedding = c.padded_vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return round(embedding + c.d_model + c.n_layer * _layer_params(c, c.d_inner))


def baseline_params(c: MultiTrackConfig) -> int:
    """Parameters of the Mamba baseline with c's shared dimensions (MambaLMHeadModel, expand = c.expand)."""
    embedding = c.padded_vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    return round(embedding + c.d_model + c.n_layer * _layer_params(c, c.expand * c.d_model, baseline=True))


def channel_alignment(c: MultiTrackConfig) -> int:
    """d_inner is a multiple of this: 8 G (G below d_model 256, where a few channels are a large share),
    times the memory heads when the memory track's channels split into heads."""
    align = 8 if c.d_model >= 256 else 1
    if c.use_char_memory:
        align = math.lcm(align, c.mem_heads)
    return align * c.tracks


def matched_d_inner(c: MultiTrackConfig) -> int:
    """The multiple of `channel_alignment` closest to giving c the baseline's parameter count (block
    params are linear in Di)."""
    align = channel_alignment(c)
    per_layer_target = _layer_params(c, c.expand * c.d_model, baseline=True)
    fixed = _layer_params(c, 0)
    per_channel = _layer_params(c, 1) - fixed
    d_inner = round((per_layer_target - fixed) / per_channel / align) * align
    return max(align, d_inner)


def _init_fields() -> set[str]:
    return {f.name for f in fields(MultiTrackConfig) if f.init}


# shared dimensions mirror mamba_lm.mamba.PRESETS of the same size; d_inner is derived to match
PRESETS: dict[str, dict] = {
    "multitrack-130m": dict(d_model=896, n_layer=16),                       # vs "mamba-130m" (126,924,672)
    "tiny": dict(d_model=64, n_layer=2, cross_heads=2, cross_head_dim=4,    # vs mamba "tiny"
                 mem_heads=2, mem_head_dim=8),
    "small-cpu": dict(d_model=256, n_layer=4, cross_heads=2, cross_head_dim=8,  # vs mamba "small-cpu"
                      mem_heads=4, mem_head_dim=16),
    "ladder-10m": dict(d_model=512, n_layer=6, mem_heads=4, mem_head_dim=16),  # the size ladder: vs mamba
    "ladder-30m": dict(d_model=768, n_layer=8),                              # "ladder-*" of the same name
    "ladder-60m": dict(d_model=768, n_layer=16),
}

# Every model variant and ablation: name -> MultiTrackConfig overrides (on any preset). "full" is the
# seed design; "revised" adds both new mechanisms; each other entry switches one thing (research_plan.md
# gives the hypothesis each one tests and the train_multitrack.py flags).
VARIANTS: dict[str, dict] = {
    "full": {},                                                  # 3 tracks, learned router + signals, cross-track
    "one-track": {"tracks": 1},                                  # multi-timescale Δ init only
    "uniform-router": {"router": "uniform"},
    "no-cross": {"cross_track": False},
    "no-signals": {"narrative_signals": False},
    "dt-clamp": {"dt_clamp_factor": 2.0},
    "plot-clock": {"plot_clock": "signals"},                      # + boundary-clocked plot track
    "plot-clock-learned": {"plot_clock": "learned"},
    "char-memory": {"char_memory": True},                         # + delta-rule character track
    "revised": {"plot_clock": "signals", "char_memory": True},    # both new mechanisms
    "revised-learned-clock": {"plot_clock": "learned", "char_memory": True},
}


def variant_config(preset: str, variant: str, **overrides) -> MultiTrackConfig:
    """multitrack_config(preset) with a `VARIANTS` entry applied, then `overrides`."""
    if variant not in VARIANTS:
        raise UserError(f"unknown multitrack variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return multitrack_config(preset, **{**VARIANTS[variant], **overrides})


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
