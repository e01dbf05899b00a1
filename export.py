"""Export a trained baseline Mamba checkpoint to the Hugging Face and/or mamba-ssm folder layouts.

    python export.py --ckpt=out/baseline/ckpt_best.pt --out=exports/baseline                 # transformers
    python export.py --ckpt=out/baseline/ckpt_best.pt --out=exports/baseline --format=both   # + mamba-ssm

--format=hf        out/ = config.json, model.safetensors, tokenizer files, README.md (model card);
                   loads with transformers.MambaForCausalLM / AutoTokenizer .from_pretrained(out)
--format=mamba_ssm out/ = config.json + pytorch_model.bin for
                   mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel.from_pretrained(out)
--format=both      out/hf/ and out/mamba_ssm/

The folder is written next to its destination under a temporary name and renamed into place when
complete, so an interrupted export leaves nothing half-written. A non-empty destination is refused
unless --overwrite=True. Only baseline (model_type "mamba") checkpoints export; multitrack models
stay repo checkpoints.
"""

import os
import shutil
import sys
from pathlib import Path

import multitrack  # noqa: F401  (registers "multitrack": such a --ckpt is refused by name, not as unknown)
from mamba_lm.configurator import apply_overrides
from mamba_lm.convert import write_hf_folder, write_mamba_ssm_folder
from mamba_lm.errors import UserError, user_errors
from mamba_lm.runtime import replace_folder
from mamba_lm.weights import export_source

# -----------------------------------------------------------------------------
ckpt = "out/baseline/ckpt_best.pt"   # repo checkpoint (.pt) to export (or an HF / mamba-ssm folder) [input path]
out = "exports/baseline"             # destination folder [output folder]
format = "hf"                        # "hf" | "mamba_ssm" | "both"
tokenizer = ""                       # tokenizer spec to bundle when the source has none ("" = the source's)
overwrite = False                    # replace a non-empty destination folder
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])

FORMATS = ("hf", "mamba_ssm", "both")


def check_destination(dest: Path) -> None:
    """Refuse a non-empty destination unless --overwrite=True (nothing is touched before this passes)."""
    if dest.is_file():
        raise UserError(f"--out={dest} is a file; pass a folder path")
    source = Path(ckpt).resolve()
    if dest.resolve() == source or dest.resolve() in source.parents:
        raise UserError(f"--out={dest} holds the checkpoint it would export (--ckpt={ckpt}); replacing it would "
                        "delete the source: choose another --out")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise UserError(f"--out={dest} exists and is not empty; pass --overwrite=True to replace it, "
                        f"or choose another --out")


def write_format(fmt: str, folder: Path, name: str, source: tuple) -> list[str]:
    """Write one layout from `source` = (model, tokenizer, info) of weights.export_source."""
    model, tok, info = source
    if fmt == "hf":
        return write_hf_folder(model, folder, tok, info, name=name)
    return write_mamba_ssm_folder(model, folder, tok, info)


def describe(folder: Path, names: list[str]) -> None:
    for name in names:
        size = (folder / name).stat().st_size
        print(f"  {folder / name}  ({size / 1e6:.2f} MB)" if size >= 1e5 else f"  {folder / name}  ({size:,} B)")


def main() -> None:
    if format not in FORMATS:
        raise UserError(f"--format={format!r}: choose one of {', '.join(FORMATS)}")
    dest = Path(out)
    check_destination(dest)
    source = export_source(ckpt, tokenizer or None)     # loaded once for every format
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fmts = ("hf", "mamba_ssm") if format == "both" else (format,)
    try:
        written = {}
        for fmt in fmts:
            sub, name = (tmp / fmt, f"{dest.name}/{fmt}") if format == "both" else (tmp, dest.name)
            written[fmt] = write_format(fmt, sub, name, source)
        replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for fmt in fmts:
        folder = dest / fmt if format == "both" else dest
        print(f"wrote {fmt} folder {folder}:")
        describe(folder, written[fmt])
        if fmt == "hf":
            print(f"load: python -c \"from transformers import AutoTokenizer, MambaForCausalLM; "
                  f"m = MambaForCausalLM.from_pretrained('{folder}'); t = AutoTokenizer.from_pretrained('{folder}')\"")
        else:
            print(f"load: python -c \"from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel; "
                  f"m = MambaLMHeadModel.from_pretrained('{folder}')\"")
        print(f"      python generate_text.py --ckpt={folder}   (this repo, via mamba_lm.weights.load_weights)")


if __name__ == "__main__":
    with user_errors():
        main()
