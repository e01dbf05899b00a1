"""Tests for mamba_lm/gutenberg.py on crafted texts of each historical PG header/footer variant."""

from mamba_lm import gutenberg
from mamba_lm.gutenberg import clean_book, looks_english, unwrap_paragraphs

LICENSE = ("\n\nEnd of the Project Gutenberg EBook of Test Book, by Anon\n\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n"
           "***** This file should be named 99999.txt *****\n\n"
           "Updated editions will replace the previous one--the old editions\nwill be renamed.\n\n"
           "START: FULL LICENSE\n\nTHE FULL PROJECT GUTENBERG LICENSE\n" + "Project Gutenberg-tm license text. " * 120)
HEADER = ("The Project Gutenberg EBook of Test Book, by Anon\n\nThis eBook is for the use of anyone anywhere "
          "at no cost and with\nalmost no restrictions whatsoever.\n\nTitle: Test Book\n\nAuthor: Anon\n\n"
          "Release Date: May, 2004 [EBook #99999]\n\nLanguage: English\n\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK TEST BOOK ***\n\n\n\n\nProduced by Jane Doe and the Online\n"
          "Distributed Proofreading Team\n\n\n\n")
PROSE = ("It was a cold morning in the town of Eldham, and the blacksmith had\n"
         "been at work since before the sun came up over the long grey hills\n"
         "behind the mill, where the river ran fast and brown after the rain.\n\n"
         "She put down her hammer and went to the door to see who was there.\n"
         "Nobody was there, only the wind and the smell of smoke in the lane.")
PROSE_CLEAN = ("It was a cold morning in the town of Eldham, and the blacksmith had been at work since before the "
               "sun came up over the long grey hills behind the mill, where the river ran fast and brown after the "
               "rain.\n\nShe put down her hammer and went to the door to see who was there. Nobody was there, only "
               "the wind and the smell of smoke in the lane.")
VERSE = ("    The wind was in the willow,\n    The rain was on the hill,\n    And all the town was sleeping\n"
         "    But the miller's wheel was still.")


def body(n=6):
    return "\n\n".join([PROSE] * n)


def test_modern_markers_crlf_and_credits():
    """Modern START/END markers with CRLF: header, 'Produced by' credits and license footer are removed."""
    raw = (HEADER + body() + LICENSE).replace("\n", "\r\n")
    text, r = clean_book(raw)
    assert text == "\n\n".join([PROSE_CLEAN] * 6)
    assert "\r" not in text and "Gutenberg" not in text and "Produced by" not in text
    assert (r.head, r.tail) == ("marker", "marker")
    assert r.credit_chars > 0 and r.header_chars > 0 and r.footer_chars > len(LICENSE) - 200


def test_start_marker_without_space_and_end_of_project_gutenbergs():
    """'***START OF THE PROJECT GUTENBERG EBOOK' and a footer 'End of Project Gutenberg's ...' are found."""
    raw = ("Project Gutenberg's Test, by Anon\n\n***START OF THE PROJECT GUTENBERG EBOOK TEST***\n\n" + body()
           + "\n\nEnd of Project Gutenberg's Test, by Anon\n\n" + "Project Gutenberg license. " * 50)
    text, r = clean_book(raw)
    assert text == "\n\n".join([PROSE_CLEAN] * 6)
    assert (r.head, r.tail) == ("marker", "marker")


def test_old_small_print_and_end_project_gutenbergs():
    """Old etexts: header ends at '*END*THE SMALL PRINT!...*END*'; footer 'End Project Gutenberg's ...'."""
    header = ("Project Gutenberg Etext The Test, by Anon\n#1 in our series\n\nCopyright laws are changing\n\n"
              "Release Date: June, 1996 [Etext# 572]\n\n" + "**The Legal Small Print** blah blah. " * 40 + "\n\n"
              "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n\n\n"
              "Scanned by Charles Keller with OmniPage Professional OCR software\n\n\n")
    raw = header + body() + "\n\n\n\nEnd Project Gutenberg's The Test, by Anon\n"
    text, r = clean_book(raw)
    assert text == "\n\n".join([PROSE_CLEAN] * 6)
    assert r.head == "marker" and r.tail == "marker" and r.credit_chars > 0
    assert gutenberg.gutenberg_id_from_header(raw) == 572
    # the variant with a space ("*END THE SMALL PRINT!") and "End of the Project Gutenberg Etext of"
    raw2 = header.replace("*END*THE SMALL", "*END THE SMALL") + body() + \
        "\n\nEnd of the Project Gutenberg Etext of The Test,\nby Anon\n"
    assert clean_book(raw2)[0] == text


def test_precleaned_text_kept_intact():
    """A hub-style pre-cleaned book (no markers, no 'Project Gutenberg' near the ends) is kept whole."""
    pre = "\n\n".join([PROSE_CLEAN] * 6)
    text, r = clean_book(pre)
    assert text == pre
    assert (r.head, r.tail, r.header_chars, r.footer_chars) == ("precleaned", "precleaned", 0, 0)


def test_no_markers_but_pg_text_uses_heuristic():
    """No marker lines but PG boilerplate at both ends: stripped by heuristic and reported as such."""
    raw = ("The Project Gutenberg Etext of Test\n\nThis etext is free.\n\n" + body()
           + "\n\nThis etext is provided by Project Gutenberg.\n\nMore legal text about etexts.\n")
    text, r = clean_book(raw)
    assert (r.head, r.tail) == ("heuristic", "heuristic")
    assert text == "\n\n".join([PROSE_CLEAN] * 6)


def test_illustrations_and_transcriber_notes_removed():
    """[Illustration: ...] (also multi-line), [Frontispiece: ...] and [Transcriber's Note: ...] blocks are removed and counted."""
    pre = (PROSE_CLEAN + "\n\n[Illustration: The mill\nat night]\n\n" + PROSE_CLEAN
           + "\n\n[Transcriber’s Note: obvious typos fixed.]\n\n[Illustration]\n\n[Frontispiece: The hill]\n\n"
           + PROSE_CLEAN)
    text, r = clean_book(pre)
    assert text == "\n\n".join([PROSE_CLEAN] * 3)
    assert r.illustrations == 3 and r.notes == 1
    assert r.illustration_chars == len("[Illustration: The mill\nat night]") + len("[Illustration][Frontispiece: The hill]")


def test_unwrap_keeps_verse_and_indented_blocks():
    """Wrapped prose becomes one line per paragraph; indented verse and short-line blocks keep their breaks."""
    text = unwrap_paragraphs(PROSE + "\n\n\n\n" + VERSE + "\n\nCONTENTS\nChapter I\nChapter II")
    paras = text.split("\n\n")
    assert paras[:2] == PROSE_CLEAN.split("\n\n")
    assert paras[2] == VERSE
    assert paras[3] == "CONTENTS\nChapter I\nChapter II"
    plain_verse = "The wind was in the willow, and\nThe rain was on the hill, and\nAnd all the town was sleeping"
    assert unwrap_paragraphs(PROSE + "\n\n" + plain_verse).split("\n\n")[2] == plain_verse


def test_unicode_nfc_and_curly_quotes_kept():
    """Text is NFC-normalised, curly quotes are kept, a BOM is dropped."""
    decomposed = "\ufeffCafe\u0301 “quoted” ’tis"
    text, _ = clean_book(decomposed * 200)
    assert "\ufeff" not in text and "Café" in text and "“quoted”" in text and "’tis" in text


def test_english_check():
    """Stop-word density separates English from French prose."""
    assert looks_english(PROSE_CLEAN * 3)
    french = "Le forgeron posa son marteau et alla à la porte pour voir qui était là. " * 30
    assert not looks_english(french)
