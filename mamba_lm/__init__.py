"""mamba_lm: everything both models and all scripts share (the core of mamba-narrative).

Modules, lowest layer first (CONTRACTS.md "Layers" says which may import which):

    errors         UserError: the one-line, exit-2 error for bad input
    configurator   --key=value overrides of a script's module-level hyperparameters
    ops            selective scan, causal conv1d, RMSNorm: CUDA kernels or pure-PyTorch twins
    tokenizer      tokenizer loading (hub id, local tokenizer.json, byte-level, demo BPE)
    gutenberg      Project Gutenberg header/footer stripping and text cleaning
    demo_corpus    procedural story generator: the offline demo corpus and long-range recall probe
    data           uint16 memmap datasets, batching, epoch order, data fingerprints
    mamba          the baseline Mamba LM (parameter names match mamba-ssm's MambaLMHeadModel)
    metrics        evaluation metrics for long-form narrative
    models         model registry: build any model type from (model_type, config dict)
    generation     sampling and recurrent (constant-memory) generation, CUDA graphs on GPU
    report         markdown writing (sample files, epoch tables) and PNG plots
    longrange      whole-book metrics: recurring names by distance, chapter detection and ranking, streaming
    evaluation     evaluate.py's stages and their resumable accumulators (resume cache)
    eval_report    evaluate.py's markdown report: tables, verdicts, PNGs
    checkpoint     self-describing checkpoints: atomic save, safe load
    interop        Hugging Face / mamba-ssm checkpoint folders: load, export
    trainer        the shared training pieces: optimizer, LR schedule, evaluation, logging

The multi-track model itself lives in the `multitrack` package, which builds on this one.
"""

__version__ = "0.2.0"
