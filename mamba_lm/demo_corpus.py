"""Procedural story corpus: the offline demo data and a controlled probe of long-range recall.

The project ships no book texts. `generate_books(num_books, seed, words_per_book)` writes small novels
from templates: a cast of named characters with stable traits (profession, home town, eye colour, a pet
and its name, a keepsake, a saying), places, weather, events, chapters with headings, prose paragraphs
and quoted dialogue. Chapter I introduces every character; later chapters refer back to those traits
thousands of characters later ("As Mara Vell, the blacksmith from Eldham, had said on the first night,
..."). Everything is deterministic in (seed, book index).

Long-range recall probe. Every back-reference whose answer is fixed by an earlier introduction (and
not by the sentence itself) is recorded as a probe:

    {"book_id": 900001, "char_offset": 18234, "answer": "Eldham", "kind": "town",
     "distance_chars": 15012, "intro_offset": 3222}

`book["TEXT"][char_offset:char_offset + len(answer)] == answer`, the text before `char_offset` is the cue
(it ends with e.g. "the blacksmith from "), and `distance_chars = char_offset - intro_offset` is how far
back the fact was introduced. An evaluator tokenizes the book, finds the token(s) of the answer and
measures whether the model predicts them; recall as a function of distance separates models that keep
long-range state from those that do not. `recall_probes(book)` returns the list; the demo text is
already in the cleaned form (one line per paragraph, blank line between paragraphs), so
`gutenberg.clean_book` leaves it unchanged and the offsets hold in the prepared data too.

Rows have the columns of the Gutenberg parquet files (TEXT, SOURCE, METADATA as a JSON string), plus
convenience keys id, title, authors and probes, so prepare_data.py runs the same pipeline on them.
"""

from __future__ import annotations

import json
import random

DEMO_ID_BASE = 900001            # demo book ids (not Project Gutenberg ids)
DEMO_SOURCE = "mamba-narrative demo corpus"

FEMALE = ["Mara", "Elin", "Tessa", "Ysolde", "Bryn", "Orla", "Nell", "Ines", "Wren", "Agnes", "Liesel",
          "Catrin", "Hilde", "Rosalind", "Petra", "Sabine", "Ida", "Maud", "Greta", "Clara", "Signe", "Vera"]
MALE = ["Tobin", "Aldric", "Corwin", "Hugo", "Piet", "Emrys", "Silas", "Jonah", "Osric", "Felix", "Bram",
        "Anselm", "Caspar", "Dorian", "Gideon", "Lorcan", "Matthias", "Rafe", "Tomas", "Ulric", "Viktor"]
SURNAMES = ["Vell", "Ashdown", "Marrow", "Kettle", "Brightwater", "Holloway", "Fenwick", "Crane", "Larkin",
            "Thorne", "Quill", "Redmayne", "Sallow", "Pennick", "Garrow", "Winter", "Blackwood", "Ostry",
            "Harrow", "Lindqvist", "Moorcroft", "Tamsin", "Everly", "Dunmore"]
TOWNS = ["Eldham", "Harrowgate", "Millbrook", "Stonereach", "Westmere", "Caddowfield", "Ravensholt",
         "Lower Fenn", "Brackenridge", "Saltcombe", "Oakhollow", "Greywater", "Thistlewick", "Marden Cross",
         "Kilnsea", "Ashby Vale", "Dunlow", "Fairhaven", "Coldharbour", "Wickerby"]
PROFESSIONS = ["blacksmith", "ferryman", "schoolteacher", "apothecary", "cartographer", "baker", "weaver",
               "shepherd", "clockmaker", "innkeeper", "bookbinder", "fisherwoman", "stonemason", "midwife",
               "glassblower", "carpenter", "miller", "physician", "lamplighter", "tailor", "beekeeper"]
EYES = ["grey", "green", "brown", "blue", "amber", "hazel", "black", "violet"]
PETS = {"dog": ["Pip", "Rufus", "Bramble", "Scout", "Juniper", "Biscuit"],
        "cat": ["Sorrel", "Mouse", "Ember", "Tansy", "Smoke", "Whisker"],
        "raven": ["Nib", "Cinder", "Hollis", "Quoth"],
        "goat": ["Clover", "Barnaby", "Nettle"],
        "horse": ["Duchess", "Thunder", "Chestnut", "Marigold"],
        "hare": ["Thistle", "Dandelion"]}
KEEPSAKES = ["silver compass", "brass key", "red scarf", "pocket watch", "carved whistle", "blue lantern",
             "leather journal", "copper ring", "wooden flute", "green umbrella", "iron locket", "ivory comb"]
SAYINGS = ["a river never asks the stones for permission", "bread first, then arguments",
           "every lock was made by someone who wanted to open it", "the fog keeps no secrets for long",
           "a kind word weighs nothing and carries far", "never trust a bridge you have not crossed twice",
           "the night is only the day with its eyes closed", "what the sea takes it returns in salt",
           "one honest map is worth ten brave guesses", "a quiet house is a listening house",
           "a cold hearth makes a warm argument", "the road remembers every foot"]
PLACES = ["the mill", "the old bridge", "the market square", "the chapel", "the harbour", "the orchard",
          "the watchtower", "the inn", "the ferry landing", "the library", "the smithy", "the lighthouse",
          "the meadow by the river", "the churchyard", "the granary", "the stone circle on the hill"]
WEATHER = ["Rain drummed on the roofs", "A thin fog lay over the fields", "The wind came hard from the north",
           "The sun was warm for the season", "Snow had fallen in the night", "The sky was the colour of slate",
           "A storm was gathering over the hills", "The air smelled of smoke and apples"]
TIMES = ["At dawn", "Late in the morning", "Towards noon", "In the afternoon", "At dusk", "Long after midnight",
         "On the following day", "Early the next week", "That evening"]
EVENTS = ["the fire at the mill", "the flood in the lower streets", "the theft of the town charter",
          "the stranger at the crossroads", "the collapse of the old bridge", "the letter with no name",
          "the night the bells rang by themselves", "the ship that came in without a crew",
          "the disappearance of the ferryman's boat", "the quarrel at the harvest feast"]
ACTIONS = ["walked slowly to {place}", "waited by {place} until the light changed", "counted the coins twice",
           "mended a torn sleeve by the window", "wrote a long letter and then burned it",
           "stood for a long time without speaking", "climbed the stairs two at a time",
           "listened to the sound of the water", "opened the shutters and looked out", "sat down heavily",
           "laughed, though nothing was funny", "crossed the square without looking back",
           "set a kettle on the fire", "studied the map spread across the table",
           "hid the key beneath a loose board", "knocked three times at the door of {place}",
           "pretended not to hear", "turned the question over and over", "followed the lane towards {place}",
           "lit a candle against the dark"]
THOUGHTS = ["Nothing in {town} had prepared {him} for this.", "It was not the first time {he} had been wrong.",
            "{He} wondered who else knew.", "Somewhere a dog was barking.", "The clock struck the hour.",
            "{He} could not shake the feeling of being watched.", "It would be a long night.",
            "There were questions that could wait, and questions that could not.",
            "{He} thought of home, and of the road back to it.", "The answer was simpler than anyone had feared."]
LINES = ["We should not stay here long", "Did you hear that", "I have seen this before", "Tell me the truth",
         "There is no time to argue", "Someone has been here before us", "I never liked this place",
         "We will need help", "You knew all along", "It is later than you think", "Keep your voice down",
         "Where did you find it", "Nobody must know", "Then we go tonight", "I am not afraid"]
REPLIES = ["said", "asked", "whispered", "answered", "muttered", "replied"]
TITLE_ADJ = ["Silent", "Lost", "Hidden", "Last", "Winter", "Broken", "Golden", "Distant", "Crooked", "Secret"]
TITLE_NOUN = ["Bridge", "Lantern", "Harbour", "Orchard", "Key", "Letter", "Tower", "Road", "Mill", "Bell"]


def roman(n: int) -> str:
    """1 -> 'I', 14 -> 'XIV'."""
    out = ""
    for value, sym in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while n >= value:
            out, n = out + sym, n - value
    return out


class _Writer:
    """Accumulates paragraphs, tracks character offsets, introductions and probes."""

    def __init__(self, book_id: int):
        self.book_id, self.paras, self.offset = book_id, [], 0
        self.intro: dict[tuple[str, str], int] = {}
        self.probes: list[dict] = []
        self.words = 0

    def add(self, pieces):
        """pieces: list of str or (answer, who, kind, mode) where mode is 'intro' or 'recall'."""
        text, start = "", self.offset + (2 if self.paras else 0)
        for p in pieces:
            if isinstance(p, str):
                text += p
                continue
            answer, who, kind, mode = p
            pos = start + len(text)
            if mode == "intro":
                self.intro.setdefault((who, kind), pos)
            elif (who, kind) in self.intro:
                first = self.intro[(who, kind)]
                self.probes.append({"book_id": self.book_id, "char_offset": pos, "answer": answer, "kind": kind,
                                    "distance_chars": pos - first, "intro_offset": first})
            text += answer
        self.paras.append(text)
        self.offset = start + len(text)
        self.words += len(text.split())


def _make_cast(rng: random.Random, n: int) -> list[dict]:
    genders = [rng.random() < 0.5 for _ in range(n)]
    female = rng.sample(FEMALE, n)
    male = rng.sample(MALE, n)
    surnames, towns = rng.sample(SURNAMES, n), rng.sample(TOWNS, n)
    profs, keeps, sayings = rng.sample(PROFESSIONS, n), rng.sample(KEEPSAKES, n), rng.sample(SAYINGS, n)
    kinds = [rng.choice(sorted(PETS)) for _ in range(n)]
    used, cast = set(), []
    for i in range(n):
        pet = rng.choice([p for p in PETS[kinds[i]] if p not in used] or PETS[kinds[i]])
        used.add(pet)
        f = genders[i]
        cast.append({"first": female[i] if f else male[i], "last": surnames[i], "town": towns[i],
                     "prof": profs[i], "eyes": rng.choice(EYES), "pet_kind": kinds[i], "pet": pet,
                     "keepsake": keeps[i], "saying": sayings[i],
                     "he": "she" if f else "he", "He": "She" if f else "He", "him": "her" if f else "him",
                     "his": "her" if f else "his"})
    return cast


def _intro(w: _Writer, c: dict, rng: random.Random):
    name = f"{c['first']} {c['last']}"
    w.add([f"{name} was a ", (c["prof"], name, "prof", "intro"), " from ", (c["town"], name, "town", "intro"),
           f". {c['He']} had ", (c["eyes"], name, "eyes", "intro"), f" eyes and kept a {c['pet_kind']} named ",
           (c["pet"], name, "pet", "intro"), f". {c['He']} never went anywhere without {c['his']} ",
           (c["keepsake"], name, "keepsake", "intro"), ". " + rng.choice(THOUGHTS).format(**c)])
    w.add([f"\"{c['saying'][0].upper() + c['saying'][1:]},\" {c['first']} said that first night, and nobody "
           "at the table forgot it."])


def _recall(w: _Writer, c: dict, others: list[dict], rng: random.Random):
    name = f"{c['first']} {c['last']}"
    o = rng.choice(others)
    form = rng.randrange(6)
    if form == 0:
        w.add([f"As {name}, the ", (c["prof"], name, "prof", "recall"), " from ", (c["town"], name, "town", "recall"),
               f", had said on the first night, \"{c['saying'][0].upper() + c['saying'][1:]}.\""])
    elif form == 1:
        w.add([f"{name} looked at {o['first']} with {c['his']} ", (c["eyes"], name, "eyes", "recall"),
               f" eyes and said nothing for a while. " + rng.choice(THOUGHTS).format(**c)])
    elif form == 2:
        w.add([f"{name} whistled for {c['his']} {c['pet_kind']}, ", (c["pet"], name, "pet", "recall"),
               f", and together they {rng.choice(ACTIONS).format(place=rng.choice(PLACES))}."])
    elif form == 3:
        w.add([f"{name} still carried the ", (c["keepsake"], name, "keepsake", "recall"),
               f" that {c['he']} had brought from ", (c["town"], name, "town", "recall"), "."])
    elif form == 4:
        w.add([f"\"You are a long way from home,\" {o['first']} told {name}, the ", (c["prof"], name, "prof", "recall"),
               ". \"I am,\" came the answer. \"But ", (c["town"], name, "town", "recall"), " will wait for me.\""])
    else:
        w.add([f"Everyone knew the {c['pet_kind']} belonged to {name}; it answered only to the name ",
               (c["pet"], name, "pet", "recall"), "."])


def _scene(w: _Writer, cast: list[dict], rng: random.Random, events: list[str]):
    c = rng.choice(cast)
    sents = [f"{rng.choice(TIMES)}, {rng.choice(WEATHER).lower()}."]
    for _ in range(rng.randint(2, 4)):
        who = rng.choice(cast)
        sents.append(f"{who['first']} {rng.choice(ACTIONS).format(place=rng.choice(PLACES))}.")
    if events and rng.random() < 0.4:
        sents.append(f"Since {rng.choice(events)}, nobody in the town slept easily.")
    sents.append(rng.choice(THOUGHTS).format(**c))
    w.add([" ".join(sents)])


def _dialogue(w: _Writer, cast: list[dict], rng: random.Random):
    a, b = rng.sample(cast, 2)
    for _ in range(rng.randint(2, 4)):
        line = rng.choice(LINES)
        if line.startswith(("Did", "Where")):  # the questions among LINES
            w.add([f"\"{line}?\" {rng.choice(['asked', 'whispered'])} {a['first']}."])
        else:  # any verb but "asked"
            w.add([f"\"{line},\" {rng.choice(REPLIES[:1] + REPLIES[2:])} {a['first']}."])
        a, b = b, a


def generate_book(index: int, seed: int = 1337, words_per_book: int = 6000) -> dict:
    """One demo novel as a parquet-like row: TEXT, SOURCE, METADATA (JSON string) + id, title, authors, probes."""
    rng = random.Random(f"demo-{seed}-{index}")
    book_id = DEMO_ID_BASE + index
    title = f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)} of {rng.choice(TOWNS)}"
    author = f"{rng.choice(SURNAMES)}, {rng.choice(FEMALE + MALE)}"
    cast = _make_cast(rng, rng.randint(4, 6))
    w = _Writer(book_id)
    w.add([title.upper()])
    w.add([f"by {author.split(', ')[1]} {author.split(', ')[0]}"])
    events: list[str] = []
    chapter = 0
    while w.words < words_per_book:
        chapter += 1
        w.add([f"CHAPTER {roman(chapter)}. {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"])
        if chapter == 1:
            w.add([f"{rng.choice(WEATHER)} on the night the travellers met at the inn."])
            for c in cast:
                _intro(w, c, rng)
            continue
        if rng.random() < 0.5 and len(events) < len(EVENTS):
            ev = rng.choice([e for e in EVENTS if e not in events])
            events.append(ev)
            w.add([f"It was in this chapter of their lives that {ev} happened, and {rng.choice(cast)['first']} "
                   "was the first to hear of it."])
        for _ in range(rng.randint(6, 10)):
            r = rng.random()
            if r < 0.45:
                _scene(w, cast, rng, events)
            elif r < 0.7:
                _dialogue(w, cast, rng)
            else:
                c = rng.choice(cast)
                _recall(w, c, [o for o in cast if o is not c], rng)
    text = "\n\n".join(w.paras)
    meta = {"language": "en", "text_id": book_id, "title": title, "authors": author,
            "subjects": "Procedurally generated fiction", "locc": "PZ", "bookshelves": "Demo"}
    return {"TEXT": text, "SOURCE": DEMO_SOURCE, "METADATA": json.dumps(meta), "id": book_id,
            "title": title, "authors": author, "probes": w.probes}


def generate_books(num_books: int = 40, seed: int = 1337, words_per_book: int = 6000) -> list[dict]:
    """`num_books` demo novels (see `generate_book`), deterministic in `seed`."""
    return [generate_book(i, seed, words_per_book) for i in range(num_books)]


def recall_probes(book: dict, min_distance: int = 0) -> list[dict]:
    """The long-range recall probes of one demo book (see module docstring), farther than min_distance chars."""
    return [p for p in book["probes"] if p["distance_chars"] >= min_distance]


def books_for_source(source: dict) -> list[dict]:
    """Regenerate the demo books of a data dir from its meta.json "source" entry (kind "demo")."""
    if source.get("kind") != "demo":
        raise ValueError(f"not a demo data source: {source.get('kind')!r}")
    return generate_books(source["num_books"], source["seed"], source["words_per_book"])
