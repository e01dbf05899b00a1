"""multitrack: the multi-track narrative Mamba (built on the shared core package `mamba_lm`).

    multitrack_config  MultiTrackConfig, presets, parameter matching to the baseline
    narrative          narrative structure signals derived from token ids (dialogue, paragraph, chapter, ...)
    router             the narrative-aware router that weights the tracks
    cross_track        cross-track attention between the tracks' states
    triple_track       the triple-track mixer (one grouped selective scan over the tracks)
    plot_clock         the plot track's boundary clock (its Δ gated by narrative boundaries)
    char_memory        the character track as a gated delta-rule key-value memory
    delta_rule         the gated delta rule: per-step recurrence, chunked form, fla kernels
    multitrack_model   MultiTrackLM: the language model built from those blocks (registered on import)

Importing the package registers model_type "multitrack" with mamba_lm.models (the core never imports
this package), so a script that may load any checkpoint starts with `import multitrack`.
"""

from multitrack import multitrack_model  # noqa: F401  (registers "multitrack" with mamba_lm.models)
