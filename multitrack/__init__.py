"""mamba-narrative: small Mamba language models for long-form fiction.

Everything the top-level scripts share lives here, once (see README "Repository layout"):

    configurator   --key=value overrides of a script's module-level hyperparameters
    tokenizer      tokenizer loading (hub id, local tokenizer.json, byte-level, demo BPE)
    gutenberg      Project Gutenberg header/footer stripping and text cleaning
    demo_corpus    procedural story generator: the offline demo corpus and long-range recall probe
    data           uint16 memmap datasets, batching, epoch order, data fingerprints
    ops            selective scan, causal conv1d, RMSNorm: CUDA kernels or pure-PyTorch twins
    mamba          the Mamba LM (parameter names match mamba-ssm's MambaLMHeadModel)
    models         model registry: build any model of the repo from (model_type, config dict)
    checkpoint     self-describing checkpoints: atomic save, safe load, build model from checkpoint
    trainer        the shared training loop pieces: optimizer, LR schedule, evaluation, logging
    generation     sampling and recurrent (constant-memory) generation, CUDA graphs on GPU
    report         markdown writing (sample files, epoch tables) and PNG plots
    narrative      narrative structure signals derived from token ids
    multitrack_model  the triple-track SSM with narrative router and cross-track attention
    metrics        evaluation metrics for long-form narrative
    interop        Hugging Face / mamba-ssm checkpoint folders: load, export
"""

__version__ = "0.1.0"
