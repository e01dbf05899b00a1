"""Narrative structure signals derived from token ids alone.

The narrative router (multitrack/router.py) conditions its per-token track weights on where a token
sits in the story: paragraph breaks, dialogue, chapter headings, sentence ends. None of this needs a
change of the data format: every signal is computed from the token ids through a lookup table built
once from the tokenizer's vocabulary (`build_signal_tables`), stored in the model as a buffer (so a
checkpoint alone rebuilds the model), plus two pieces of running state computed in parallel with
cumulative sums and carried in the generation cache.

Table columns (one row per token id, `SIGNAL_COLUMNS`), from the bytes the id decodes to:

    newline          the token contains "\\n"
    double_newline   the token contains "\\n\\n" (a paragraph break inside one token, e.g. NeoX's "\\n\\n")
    starts_newline   the first non-blank byte is "\\n"       } a break split over two tokens ("\\n" + "\\n",
    ends_newline     the last non-blank byte is "\\n"        }  always so for byte-level vocabularies)
    quote_count      number of double-quote characters: " (U+0022), “ (U+201C), ” (U+201D)
    heading          a chapter-heading word: CHAPTER, Chapter, BOOK, PART, VOLUME, ACT, SCENE, STAVE,
                     CANTO, PROLOGUE, EPILOGUE (or an upper-case prefix of >= 4 letters of one, e.g. "CHAP")
    sentence_end     ends in . ! ? (closing quotes/brackets allowed after), not an abbreviation ("Mr.")
    scene_mark       only '*', '#', '⁂' and blanks, e.g. "***" or " *" (scene-break lines "* * *")
    doc_boundary     the end-of-text id (eos) that separates books in the token stream

Per-token features the router sees (`FEATURE_NAMES`, float 0/1), for token t:

    paragraph_break[t] = double_newline[t] or (starts_newline[t] and ends_newline[t-1])
    reset[t]           = paragraph_break[t] or doc_boundary[t]
    paragraph_start[t] = reset[t-1] and not reset[t]
    parity_after[t]    = (number of quote characters since the last reset, up to and including t) mod 2
    in_dialogue[t]     = (parity_after[t-1] or quote_count[t] > 0) and not reset[t]

The dialogue parity restarts at every paragraph break: fiction opens a quote again at the start of each
paragraph of a long speech without closing the previous one, so a parity that ran across paragraphs
would flip inside-out after such a speech. Limits (documented, not bugs): single quotes (‘ ’ and ')
are ignored because they double as apostrophes; a curly quote split across byte tokens (byte-level
vocabularies) is not seen, straight quotes always are; a heading word split into short BPE pieces
("CH" + "APTER") and any heading in a byte-level vocabulary is not flagged.

State carried between chunks and through `step` (`NarrativeState`, all (B,)):
    parity (long): the dialogue parity after the last token; prev_ends_newline (bool); prev_reset (bool).

The decode step reads the same rules as a state machine (`narrative_transitions`): the state takes 8
values and a token's effect depends only on its table row, of which a vocabulary has few distinct ones
(K), so features and next state of every (row, state) pair are one lookup, built by `narrative_step`
itself (the reference) once per table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mamba_lm.gutenberg import is_heading_word

SIGNAL_COLUMNS = ("newline", "double_newline", "starts_newline", "ends_newline", "quote_count",
                  "heading", "sentence_end", "scene_mark", "doc_boundary")
COL = {name: i for i, name in enumerate(SIGNAL_COLUMNS)}

FEATURE_NAMES = ("newline", "paragraph_break", "paragraph_start", "quote", "in_dialogue",
                 "heading", "sentence_end", "scene_mark", "doc_boundary")
N_FEATURES = len(FEATURE_NAMES)

# token types over which router statistics are reported (rows of `token_types`)
TOKEN_TYPES = ("all", "narration", "dialogue", "paragraph_start", "sentence_end", "heading")

QUOTE_CHARS = ('"', "\u201c", "\u201d")
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mme", "mlle", "messrs", "jr", "sr", "capt", "col", "gen",
                 "rev", "prof", "lt", "no", "vol", "ch", "sq", "esq", "hon", "co", "etc", "viz"}
CLOSERS = "\"'\u201d\u2019)]"
SCENE_MARK_CHARS = set("*#\u2042 \t")
BLANKS = b" \t\r"


def _is_sentence_end(text: str) -> bool:
    s = text.strip().rstrip(CLOSERS)
    if not s or s[-1] not in ".!?":
        return False
    if s[-1] == ".":
        word = s[:-1].split()[-1].lower() if s[:-1].split() else ""
        word = word.lstrip("\"'\u201c\u2018(")
        if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):   # "Mr." / initials "J."
            return False
    return True


def token_signals(token: bytes, is_eos: bool = False) -> list[int]:
    """The `SIGNAL_COLUMNS` row of one token, from the bytes it decodes to."""
    row = [0] * len(SIGNAL_COLUMNS)
    if is_eos:
        row[COL["doc_boundary"]] = 1
        return row
    text = token.decode("utf-8", errors="ignore")      # partial UTF-8 (byte pieces) contributes nothing
    row[COL["newline"]] = int(b"\n" in token)
    row[COL["double_newline"]] = int(b"\n\n" in token or b"\n\r\n" in token)
    row[COL["starts_newline"]] = int(token.lstrip(BLANKS).startswith(b"\n"))
    row[COL["ends_newline"]] = int(token.rstrip(BLANKS).endswith(b"\n"))
    row[COL["quote_count"]] = min(255, sum(text.count(q) for q in QUOTE_CHARS))
    stripped = text.strip()
    row[COL["heading"]] = int(is_heading_word(stripped))
    row[COL["sentence_end"]] = int(_is_sentence_end(text))
    row[COL["scene_mark"]] = int(bool(stripped) and set(stripped) <= SCENE_MARK_CHARS
                                 and any(c in "*#\u2042" for c in stripped))
    return row


def build_signal_tables(tokenizer) -> torch.Tensor:
    """Signal lookup table of a vocabulary: (vocab_size, len(SIGNAL_COLUMNS)) uint8.

    tokenizer: a `mamba_lm.tokenizer.TextTokenizer` (byte-level or BPE); uses `token_bytes(i)` and
    `eos_id`. Values are 0/1 flags except `quote_count` (0..255). About a second for a 50k vocabulary.
    """
    rows = [token_signals(tokenizer.token_bytes(i), is_eos=(i == tokenizer.eos_id))
            for i in range(tokenizer.vocab_size)]
    return torch.tensor(rows, dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# running state and per-token features

@dataclass
class NarrativeState:
    """Narrative state after the last processed token of each sequence; tensors updated in place."""

    parity: torch.Tensor             # (B,) long, dialogue quote parity since the last paragraph break
    prev_ends_newline: torch.Tensor  # (B,) bool, the last token ended with "\n"
    prev_reset: torch.Tensor         # (B,) bool, the last token was a paragraph break or eos

    @classmethod
    def zeros(cls, batch_size: int, device=None) -> "NarrativeState":
        z = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return cls(torch.zeros(batch_size, dtype=torch.long, device=device), z.clone(), z.clone())

    def copy_(self, other: "NarrativeState") -> None:
        self.parity.copy_(other.parity)
        self.prev_ends_newline.copy_(other.prev_ends_newline)
        self.prev_reset.copy_(other.prev_reset)

    def reset(self) -> None:
        self.parity.zero_()
        self.prev_ends_newline.zero_()
        self.prev_reset.zero_()


def _shift_right(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """x: (B, L), first: (B,) -> (B, L) with out[:, 0] = first, out[:, t] = x[:, t-1]."""
    return torch.cat([first[:, None].to(x.dtype), x[:, :-1]], dim=1)


def dialogue_parity(quote_count: torch.Tensor, reset: torch.Tensor, parity0: torch.Tensor) -> torch.Tensor:
    """Quote parity after each token, restarting at reset tokens; parallel over L (cumsum + cummax).

    quote_count: (B, L) long; reset: (B, L) bool (a reset token leaves parity 0); parity0: (B,) long,
    the parity before the first token. Returns parity_after (B, L) long in {0, 1}:
        parity_after[t] = (sum of quote_count over (last reset <= t, t]) mod 2,
                          or (parity0 + sum over [0, t]) mod 2 when no reset so far.
    """
    b, l = quote_count.shape
    csum = torch.cumsum(quote_count, dim=1)                                  # (B, L) inclusive
    pos = torch.arange(l, device=quote_count.device).expand(b, l)
    last_reset = torch.cummax(torch.where(reset, pos, torch.full_like(pos, -1)), dim=1).values
    csum_at_reset = torch.gather(csum, 1, last_reset.clamp(min=0))
    since = torch.where(last_reset >= 0, csum - csum_at_reset, csum + parity0[:, None])
    return since % 2


def narrative_features(rows: torch.Tensor, state: NarrativeState | None = None):
    """Router features and statistic token types for a chunk of tokens.

    rows: (B, L, len(SIGNAL_COLUMNS)) signal-table rows of the chunk's ids (`table[input_ids]`);
    state: the narrative state before the chunk (None: start of a sequence, all zero).
    Returns (features (B, L, N_FEATURES) float32, token_types (B, L, len(TOKEN_TYPES)) bool,
    new_state: NarrativeState after the chunk). An empty chunk returns the state unchanged.
    """
    b, l, _ = rows.shape
    if state is None:
        state = NarrativeState.zeros(b, device=rows.device)
    r = rows.long()
    flag = lambda name: r[..., COL[name]] > 0                                # noqa: E731
    quotes = r[..., COL["quote_count"]]                                      # (B, L)
    prev_ends_nl = _shift_right(flag("ends_newline"), state.prev_ends_newline)
    para_break = flag("double_newline") | (flag("starts_newline") & prev_ends_nl)
    reset = para_break | flag("doc_boundary")
    para_start = _shift_right(reset, state.prev_reset) & ~reset
    parity_after = dialogue_parity(quotes, reset, state.parity)            # (B, L)
    parity_before = _shift_right(parity_after, state.parity)
    in_dialogue = ((parity_before > 0) | (quotes > 0)) & ~reset
    features = torch.stack([flag("newline"), para_break, para_start, quotes > 0, in_dialogue,
                            flag("heading"), flag("sentence_end"), flag("scene_mark"),
                            flag("doc_boundary")], dim=-1).float()
    ones = torch.ones_like(reset)
    types = torch.stack([ones, ~in_dialogue, in_dialogue, para_start, flag("sentence_end"),
                         flag("heading")], dim=-1)
    if l == 0:
        return features, types, state
    new_state = NarrativeState(parity_after[:, -1].clone(), flag("ends_newline")[:, -1].clone(),
                               reset[:, -1].clone())
    return features, types, new_state


def narrative_step(rows: torch.Tensor, state: NarrativeState) -> torch.Tensor:
    """`narrative_features` for ONE token per sequence, updating `state` in place (the decode step).

    rows: (B, len(SIGNAL_COLUMNS)) uint8 table rows of the tokens; returns features (B, N_FEATURES)
    float32, equal to `narrative_features(rows[:, None], state)[0][:, 0]` (tested). About a fifth of
    the ops of the chunk path (no cumsum / cummax / gather, no token types): decode speed.
    """
    flags = rows > 0                                                         # (B, C) bool
    quotes = rows[:, COL["quote_count"]].long()
    quoted = flags[:, COL["quote_count"]]
    para_break = flags[:, COL["double_newline"]] | (flags[:, COL["starts_newline"]] & state.prev_ends_newline)
    reset = para_break | flags[:, COL["doc_boundary"]]
    para_start = state.prev_reset & ~reset
    in_dialogue = ((state.parity > 0) | quoted) & ~reset
    features = torch.stack([flags[:, COL["newline"]], para_break, para_start, quoted, in_dialogue,
                            flags[:, COL["heading"]], flags[:, COL["sentence_end"]],
                            flags[:, COL["scene_mark"]], flags[:, COL["doc_boundary"]]], dim=-1).float()
    state.parity.copy_(torch.where(reset, 0, (state.parity + quotes) % 2))
    state.prev_ends_newline.copy_(flags[:, COL["ends_newline"]])
    state.prev_reset.copy_(reset)
    return features


# ----------------------------------------------------------------------------------------------
# the decode step as a state machine

N_STATES = 8     # (parity, prev_ends_newline, prev_reset) in {0, 1}^3: state code = parity + 2 ends + 4 reset


@dataclass
class NarrativeTransitions:
    """`narrative_step` tabulated for one signal table, K = its distinct rows, entry e = 8 k + state code:

    token_class (V,) long: the row class k of each token id
    features    (K 8, N_FEATURES) float32: the features of a token of class k read in state code s
    next_state  (K 8, 3) long: (parity, prev_ends_newline, prev_reset) after it
    """

    token_class: torch.Tensor
    features: torch.Tensor
    next_state: torch.Tensor


def narrative_transitions(table: torch.Tensor) -> NarrativeTransitions:
    """Tabulate `narrative_step` over every (distinct table row, state) pair: table (V, len(SIGNAL_COLUMNS))
    uint8 -> NarrativeTransitions. Built by running the reference step on K x 8 rows (K = 15 for the
    GPT-NeoX vocabulary), so the lookup equals the step by construction (and is tested equal)."""
    rows, token_class = torch.unique(table, dim=0, return_inverse=True)   # (K, C), (V,)
    code = torch.arange(N_STATES, device=table.device).repeat(rows.shape[0])   # (K 8,): entry 8 k + s
    state = NarrativeState(code & 1, (code & 2) > 0, (code & 4) > 0)
    features = narrative_step(rows.repeat_interleave(N_STATES, dim=0), state)
    next_state = torch.stack([state.parity, state.prev_ends_newline.long(), state.prev_reset.long()], dim=-1)
    return NarrativeTransitions(token_class.long(), features, next_state)


def narrative_entry(input_ids: torch.Tensor, state: NarrativeState, transitions: NarrativeTransitions) -> torch.Tensor:
    """`narrative_step` as a table lookup: input_ids (B,) -> entry (B,) long into `transitions`' tables
    (its features: `transitions.features[entry]`, equal to narrative_step's), updating `state` in place.
    Nine ops instead of about twenty: the decode step of the multi-track model."""
    entry = torch.add(state.parity, state.prev_ends_newline, alpha=2).add_(state.prev_reset, alpha=4)
    entry.add_(transitions.token_class[input_ids], alpha=N_STATES)                     # 8 k + s
    after = transitions.next_state[entry]                                              # (B, 3)
    state.parity.copy_(after[:, 0])
    state.prev_ends_newline.copy_(after[:, 1])
    state.prev_reset.copy_(after[:, 2])
    return entry
