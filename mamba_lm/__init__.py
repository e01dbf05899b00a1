"""mamba_lm: everything both models and all scripts share (the core of mamba-narrative).

Modules, lowest layer first (CONTRACTS.md "Layers" says which may import which; tests/test_layout.py checks it):

    errors         UserError: the one-line, exit-2 error for bad input
    runtime        device, dtype and autocast; atomic file writes; parameter counts
    configurator   --key=value overrides of a script's module-level hyperparameters
    ops            selective scan, causal conv1d, RMSNorm: CUDA kernels or pure-PyTorch twins
    tokenizer      tokenizer loading (hub id, local tokenizer.json, byte-level, demo BPE)
    gutenberg      Project Gutenberg header/footer stripping and text cleaning
    demo_corpus    procedural story generator: the offline demo corpus and long-range recall probe
    sources        book sources of prepare_data.py: hub, demo, parquet / jsonl / .txt readers, decoding
    data           uint16 memmap datasets, batching, epoch order, data fingerprints
    streams        book streams for stateful training: each batch row reads whole books, window after window
    mamba          the baseline Mamba LM (parameter names match mamba-ssm's MambaLMHeadModel)
    stateful       state carried across windows with per-row resets (the model side of stateful training)
    metrics        evaluation metrics for long-form narrative
    report         markdown writing (sample files, epoch tables) and PNG plots (loss, router usage)
    generation     sampling and recurrent (constant-memory) generation, CUDA graphs on GPU
    recall_gate    synthetic narrative-recall gate: facts bound to characters, asked at controlled distances
    stats          seed statistics: paired t intervals, tokens-to-target, the research plan's decision rule
    models         model registry: build any registered model type from (model_type, config dict)
    longrange      whole-book metrics: recurring names by distance, chapter detection and ranking, streaming
    convert        Hugging Face / mamba-ssm folder formats <-> our model (config and key maps, read, write)
    checkpoint     self-describing repo checkpoints: atomic save, safe load
    weights        the one door for weights: load_weights(repo .pt | HF folder | mamba-ssm folder)
    distributed    DDP / FSDP wrapping and full-state gather / load for the training loop
    rundir         a run's out_dir: checks before touching it, resume checks, step-log trimming
    stream_training  the trainer's stateful mode: rows' book streams, carried caches, carried-state val loss
    trainer        the training loop and its pieces: optimizer, LR schedule, evaluation, logging
    evaluation     evaluate.py's stages and their resumable accumulators (resume cache)
    eval_report    evaluate.py's markdown report: tables, verdicts, PNGs
    plan           experiment plans (run_plan.py): validated queue of paired runs, driven in resumable pieces
    plan_report    a plan's markdown report: arms over seeds, paired tests, loss / gate / ladder PNGs

The multi-track model lives in the `multitrack` package, which builds on this one and registers its
model type when imported; nothing here imports it.
"""

__version__ = "0.2.0"
