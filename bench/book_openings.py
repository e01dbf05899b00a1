"""Write the openings of held-out books as a prompt file for generate_text.py (--prompt_file).

    python bench/book_openings.py --data_dir=data/gutenberg-neox --split=test --num_books=4 --out=prompts.txt
    python generate_text.py --ckpt=out/baseline/ckpt_best.pt --prompt_file=prompts.txt

Each prompt is the opening of one book of the split, after the first `skip_tokens` tokens (title pages and
tables of contents are poor prompts), (or the first prose window after it, at steps of `skip_tokens`), starting at a paragraph break and ending at the last paragraph or
sentence end within `prompt_tokens` tokens. Books are taken in split order, every one long enough, so
the same data dir always gives the same prompts: the models compared see identical prompts.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mamba_lm.configurator import apply_overrides  # noqa: E402
from mamba_lm.errors import UserError, user_errors  # noqa: E402

# ----------------------------------------------------------------------------------------------
data_dir = "data/gutenberg-neox"  # prepared by prepare_data.py [input folder]
split = "test"                    # val | test: books the models never trained on
num_books = 4                     # prompts to write (one per book) [>=1]
skip_tokens = 300                 # skip the book's first tokens (title page, contents) [>=0]
prompt_tokens = 120               # at most this many tokens per prompt [>=1]
out = "generations/prompts_test_openings.txt"  # the prompt file (prompts separated by lines of ---) [output file]
# ----------------------------------------------------------------------------------------------
config = apply_overrides(globals(), sys.argv[1:])


def opening(text: str) -> str:
    """From the first paragraph break, up to the last paragraph break or sentence end ('' if none)."""
    start = text.find("\n\n")
    body = text[start + 2:] if start >= 0 else text
    cut = body.rfind("\n\n")
    if cut < len(body) // 3:
        ends = [m.end() for m in re.finditer(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)[.!?][\"'”’)]?(?=\s)", body)]
        cut = ends[-1] if ends else -1
    return body[:cut].strip() if cut > 0 else ""


def is_prose(text: str) -> bool:
    """Mostly lower-case letters in sentences: not a title page, a table of contents or a heading list."""
    letters = [c for c in text if c.isalpha()]
    return len(text) >= 80 and len(letters) > 0 and sum(c.islower() for c in letters) / len(letters) > 0.8


def main():
    from mamba_lm.data import TokenSplit
    from mamba_lm.tokenizer import load_tokenizer

    data = TokenSplit(data_dir, split)
    tok_path = os.path.join(data_dir, "tokenizer.json")
    tok = load_tokenizer("byte" if data.meta["tokenizer"].get("kind") == "byte" else tok_path)
    prompts = []
    for _book, start, n in data.book_spans():
        for offset in range(skip_tokens, min(n - prompt_tokens, 20 * skip_tokens), skip_tokens):  # first prose window
            text = opening(tok.decode(data.tokens[start + offset:start + offset + prompt_tokens].tolist()))
            if is_prose(text):
                prompts.append(text)
                break
        if len(prompts) == num_books:
            break
    if not prompts:
        raise UserError(f"no book of the {split} split of {data_dir} has {skip_tokens + prompt_tokens} tokens of prose; "
                        "lower --skip_tokens / --prompt_tokens")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n---\n".join(prompts) + "\n")
    print(f"wrote {len(prompts)} prompts from the {split} split to {out}")


if __name__ == "__main__":
    with user_errors():
        main()
