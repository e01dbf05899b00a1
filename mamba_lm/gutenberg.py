"""Project Gutenberg text cleaning: header/footer stripping, unwrapping, markers, English check.

Two kinds of input reach `clean_book`:
  * original PG files (the shared corpus): license header, `\\r\\n`, license footer, all kept byte for byte;
  * pre-cleaned text (Hugging Face `sedthh/gutenberg_english`): header/footer already removed.
Head and tail are decided independently, so a pre-cleaned book is never dropped or cut for lacking markers.

Header (the end of the header is the *last* of these found in the first half, before any end marker):
  "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***", "***START OF THE PROJECT GUTENBERG EBOOK ...",
  and the old small-print block's last line "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.xx*END*"
  (also spelled "*END THE SMALL PRINT!..."). Credit paragraphs right after the header ("Produced by ...",
  "Prepared by", "Scanned by", "E-text prepared by", "Transcribed by") are removed too.
Footer (from the *first* of these found after the header): "*** END OF THE/THIS PROJECT GUTENBERG EBOOK",
  "***END OF ...", "End of the Project Gutenberg EBook/Etext of ...", "End of Project Gutenberg's ...",
  "End Project Gutenberg's ...".
No marker found (rule, counted per book as head/tail status):
  * "precleaned": "Project Gutenberg" does not occur in the first (last) 3,000 characters -> nothing removed;
  * "heuristic": it does -> header: cut after the paragraph holding the last "Project Gutenberg"/"etext"/
    "ebook"/"small print" mention in the first 3,000 characters, extended over following paragraphs that
    still mention them (up to 6,000 characters); footer: cut from the paragraph holding the first
    "Project Gutenberg" mention in the last 3,000 characters.

Text normalisation (documented choices):
  * `\\r\\n` and lone `\\r` -> `\\n`; BOM removed; Unicode NFC (the NeoX tokenizer normalises to NFC too).
  * Curly quotes and dashes are KEPT: they are the author's/editor's text, NeoX has tokens for them, and
    straightening them would mix styles inside one corpus and lose information a generator could learn.
  * Hard-wrapped prose is UNWRAPPED to one line per paragraph, paragraphs separated by one blank line:
    saves roughly one token per line (~8% of NeoX tokens) and gives the paragraph structure the narrative
    router uses. A block (lines between blank lines) is unwrapped only if it looks like wrapped prose:
    no continuation line is indented, every line but the last is at least 50% of the book's wrap width
    (90th percentile of line lengths), and (for blocks of 4+ lines) at most half the continuation
    lines start with a capital letter. Verse, letters' address blocks, tables, tables of contents and
    indented quotations keep their line breaks (trailing spaces removed). Blank-line runs collapse to one.
  * "[Illustration]", "[Illustration: ...]" and "[Frontispiece: ...]" markers and "[Transcriber's Note: ...]"
    blocks (and a paragraph starting with "Transcriber's Note") are removed.

`clean_book(raw) -> (text, report)` where report counts what was removed (chars) and how head/tail were found.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass

EDGE_CHARS = 3000          # "pre-cleaned" test window at each end
PG_RE = re.compile(r"project\s+gutenberg", re.I)

START_MARKERS = [
    re.compile(r"^[ \t]*\*{2,}[ \t]*START[ \t]+OF[ \t]+(?:THE[ \t]+|THIS[ \t]+)?PROJECT[ \t]+GUTENBERG.*$", re.I | re.M),
    re.compile(r"^.*\*[ \t]*END[ \t]*\*?[ \t]*THE[ \t]+SMALL[ \t]+PRINT.*$", re.I | re.M),
]
END_MARKERS = [
    re.compile(r"^[ \t]*\*{2,}[ \t]*END[ \t]+OF[ \t]+(?:THE[ \t]+|THIS[ \t]+)?PROJECT[ \t]+GUTENBERG.*$", re.I | re.M),
    re.compile(r"^[ \t]*End[ \t]+(?:of[ \t]+)?(?:the[ \t]+)?Project[ \t]+Gutenberg.*$", re.I | re.M),
]
CREDIT_RE = re.compile(r"^(?:produced|prepared|scanned|transcribed|e-?text\s+prepared|html\s+version|proofread|"
                       r"this\s+(?:project\s+gutenberg\s+)?e-?(?:text|book)\s+was\s+(?:prepared|produced))"
                       r"\s+(?:by|from)\b", re.I)
ILLUSTRATION_RE = re.compile(r"\[\s*(?:Illustrations?|Frontispiece)\b[^\[\]]{0,2000}\]", re.I)
NOTE_RE = re.compile(r"\[\s*Transcriber[’']?s?\s+Notes?\b[^\[\]]{0,5000}\]", re.I)
NOTE_PARA_RE = re.compile(r"(?:^|\n\n)(Transcriber[’']?s?\s+Notes?\b[^\n]*(?:\n[^\n]+)*)", re.I)
HEURISTIC_RE = re.compile(r"project\s+gutenberg|e-?text|e-?book|small\s+print", re.I)

STOP_WORDS = frozenset(
    "the and of to a in that it was he i his you her she with for as had not but on at be is my by they "
    "him this all which were from so have me we there one said an no would or what if them their been "
    "when who are could into will more then up out do".split())
WORD_RE = re.compile(r"[A-Za-z]+")

# chapter-heading words (the narrative signals of multitrack/narrative.py and the chapter detection of
# mamba_lm/longrange.py both read them from here)
HEADING_WORDS = ("CHAPTER", "BOOK", "PART", "VOLUME", "ACT", "SCENE", "STAVE", "CANTO", "PROLOGUE",
                 "EPILOGUE")
HEADING_TITLE_CASE = ("Chapter", "Prologue", "Epilogue", "Stave", "Canto")


def is_heading_word(word: str) -> bool:
    """A chapter-heading word: one of HEADING_TITLE_CASE, or an upper-case HEADING_WORDS entry or an
    upper-case prefix of >= 4 letters of one ("CHAP", as in "CHAP. IV", or a BPE piece of "CHAPTER")."""
    if word in HEADING_TITLE_CASE:
        return True
    if not word.isalpha() or not word.isupper():
        return False
    return word in HEADING_WORDS or (len(word) >= 4 and any(h.startswith(word) for h in HEADING_WORDS))


@dataclass
class CleanReport:
    """What `clean_book` removed from one book (character counts are of the normalised text)."""
    chars_in: int = 0
    chars_out: int = 0
    head: str = "none"          # "marker" | "precleaned" | "heuristic"
    tail: str = "none"          # "marker" | "precleaned" | "heuristic"
    header_chars: int = 0
    footer_chars: int = 0
    credit_chars: int = 0       # "Produced by ..." paragraphs after the header
    illustration_chars: int = 0
    note_chars: int = 0         # transcriber's notes
    illustrations: int = 0
    notes: int = 0
    unwrapped_paragraphs: int = 0
    kept_blocks: int = 0        # multi-line blocks kept with their line breaks (verse, tables, ...)

    def as_dict(self) -> dict:
        return asdict(self)


def normalize(raw: str) -> str:
    """CRLF/CR -> LF, BOM removed, Unicode NFC."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    return unicodedata.normalize("NFC", text)


def _next_blank_line(text: str, pos: int) -> int:
    """Index just after the paragraph containing `pos` (the next blank line), or len(text)."""
    k = text.find("\n\n", pos)
    return len(text) if k < 0 else k


def _first_end_marker(text: str, lo: int = 0) -> int | None:
    """Start of the earliest end-marker line at or after `lo`, or None."""
    return min((m.start() for rx in END_MARKERS if (m := rx.search(text, lo))), default=None)


def find_header_end(text: str) -> tuple[int, str]:
    """(index where the book body starts, how it was found: 'marker' | 'precleaned' | 'heuristic').

    Start markers count only in the first half and before the first end marker (old files repeat the
    small print after the footer)."""
    first_end = _first_end_marker(text)
    limit = min(len(text) // 2, first_end if first_end is not None else len(text))
    ends = [m.end() for rx in START_MARKERS for m in rx.finditer(text, 0, limit)]
    if ends:
        return max(ends), "marker"
    window = min(EDGE_CHARS, len(text) // 2)
    if not PG_RE.search(text, 0, window):
        return 0, "precleaned"
    # Heuristic: the last PG/etext mention in the first EDGE_CHARS, then keep going while the following
    # paragraphs (within 2x the window) still talk about Project Gutenberg / etexts / small print.
    hits = [m.start() for m in HEURISTIC_RE.finditer(text, 0, window)]
    end = _next_blank_line(text, hits[-1])
    while end < min(len(text) // 2, 2 * EDGE_CHARS):
        nxt = _next_blank_line(text, end + 2)
        if not HEURISTIC_RE.search(text, end, nxt):
            break
        end = nxt
    return end, "heuristic"


def find_footer_start(text: str, body_start: int) -> tuple[int, str]:
    """(index where the footer starts, 'marker' | 'precleaned' | 'heuristic'): the first end marker after
    the header (a short book's license footer can be longer than the book)."""
    first_end = _first_end_marker(text, body_start)
    if first_end is not None:
        return first_end, "marker"
    tail_lo = max(body_start, len(text) - EDGE_CHARS, len(text) // 2)
    m = PG_RE.search(text, tail_lo)
    if not m:
        return len(text), "precleaned"
    para = text.rfind("\n\n", tail_lo, m.start())
    return (para + 2 if para >= 0 else m.start()), "heuristic"


def _strip_credits(body: str) -> tuple[str, int]:
    """Remove 'Produced by ...' style paragraphs among the first 6 non-empty paragraphs of the body."""
    stripped = body.lstrip("\n")
    lead = len(body) - len(stripped)
    out, removed, scanned = [], 0, 0
    for p in stripped.split("\n\n"):
        if scanned < 6 and p.strip():
            scanned += 1
            if CREDIT_RE.match(p.strip()):
                removed += len(p) + 2
                continue
        out.append(p)
    return "\n" * lead + "\n\n".join(out), removed


def _remove(rx: re.Pattern, text: str) -> tuple[str, int, int]:
    """Delete every match of rx; returns (text, chars removed, matches)."""
    n_chars, n = 0, 0

    def drop(m):
        nonlocal n_chars, n
        n_chars += len(m.group(0))
        n += 1
        return ""
    return rx.sub(drop, text), n_chars, n


def wrap_width(lines: list[str]) -> int:
    """The book's hard-wrap width: 90th percentile of non-empty line lengths (at least 20)."""
    lengths = sorted(len(l) for l in lines if l.strip())
    if not lengths:
        return 80
    return max(20, lengths[int(0.9 * (len(lengths) - 1))])


def is_wrapped_prose(block: list[str], width: int) -> bool:
    """True if a multi-line block looks like one hard-wrapped prose paragraph (see module docstring)."""
    cont = block[1:]
    if any(l[:1].isspace() for l in cont):
        return False
    if any(len(l.rstrip()) < 0.5 * width for l in block[:-1]):
        return False
    if len(cont) < 3:  # too few lines to judge capitals: a sentence may start at a line start
        return True
    capitals = sum(1 for l in cont if l[:1].isupper())
    return capitals <= 0.5 * len(cont)


def unwrap_paragraphs(text: str, report: CleanReport | None = None) -> str:
    """One line per prose paragraph, blocks separated by exactly one blank line; verse/indented blocks kept."""
    lines = [l.rstrip() for l in text.split("\n")]
    width = wrap_width(lines)
    blocks, cur = [], []
    for l in lines:
        if l.strip():
            cur.append(l)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    out = []
    for b in blocks:
        if len(b) == 1:
            out.append(b[0])
        elif is_wrapped_prose(b, width):
            para = b[0].strip()
            for l in b[1:]:
                para += ("" if para.endswith("-") else " ") + l.strip()
            out.append(para)
            if report is not None:
                report.unwrapped_paragraphs += 1
        else:
            out.append("\n".join(b))
            if report is not None:
                report.kept_blocks += 1
    return "\n\n".join(out)


def clean_book(raw: str, unwrap: bool = True) -> tuple[str, CleanReport]:
    """Clean one book (original PG file or pre-cleaned text). Returns (text, report). Text may be ''."""
    text = normalize(raw)
    r = CleanReport(chars_in=len(text))
    body_start, r.head = find_header_end(text)
    footer_start, r.tail = find_footer_start(text, body_start)
    r.header_chars, r.footer_chars = body_start, len(text) - footer_start
    body = text[body_start:footer_start]
    if r.head != "precleaned":
        body, r.credit_chars = _strip_credits(body)
    body, r.illustration_chars, r.illustrations = _remove(ILLUSTRATION_RE, body)
    body, c1, n1 = _remove(NOTE_RE, body)
    body, c2, n2 = _remove(NOTE_PARA_RE, body)
    r.note_chars, r.notes = c1 + c2, n1 + n2
    body = unwrap_paragraphs(body, r) if unwrap else re.sub(r"\n{3,}", "\n\n", body).strip("\n")
    r.chars_out = len(body)
    return body, r


def english_score(text: str, sample_chars: int = 20000) -> float:
    """Fraction of words in a sample that are common English stop words (English prose: ~0.4-0.5)."""
    words = WORD_RE.findall(text[:sample_chars])
    if not words:
        return 0.0
    return sum(1 for w in words if w.lower() in STOP_WORDS) / len(words)


def looks_english(text: str, threshold: float = 0.2) -> bool:
    """Cheap English check for books without language metadata."""
    return english_score(text) >= threshold


def gutenberg_id_from_header(text: str) -> int | None:
    """The ebook number from a PG header: '[EBook #1342]', '[Etext #3023]', '[Etext# 572]', '[eBook #5]'."""
    m = re.search(r"\[\s*E-?(?:Book|text)\s*#\s*(\d+)\s*\]", text[:20000], re.I)
    return int(m.group(1)) if m else None
