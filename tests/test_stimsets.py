"""Stimulus sets as data: this project's set format, the research layouts' loaders, contrasts by labels, and
analyze.py with a user's set and contrast. Small files written here in each layout, never the originals."""
import json

import numpy as np
import pytest

import analyze
from topolm import analysis, stimsets
from topolm.stimuli import STIMULI_DIR
from conftest import one_error_line, run_main


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_evlab_localizer_csv(tmp_path):
    path = _write(tmp_path / "langloc.csv", "stim1,stim2,stim3,condition\n"
                                            "The,dog,ran,S\nblorp,vang,tris,N\nA,cat,sat,S\ndreb,,plim,N\n")
    s = stimsets.read_evlab(path)
    assert s.name == "localizer" and [it.text for it in s.items] == ["The dog ran", "A cat sat", "blorp vang tris",
                                                                      "dreb plim"]
    assert [it.labels for it in s.items] == [{"condition": c} for c in "SSNN"]
    assert [it.match for it in s.items] == ["0", "1", "0", "1"]  # item k of S is matched with item k of N
    assert all(it.span is None for it in s.items) and list(s.contrasts) == ["localizer"]
    assert stimsets.read_any(path).items == s.items
    with pytest.raises(ValueError, match="same number of items"):
        stimsets.read_evlab(_write(tmp_path / "odd.csv", "stim1,condition\nThe,S\nA,S\nblorp,N\n"))
    with pytest.raises(ValueError, match="line 2: condition 'W'"):
        stimsets.read_evlab(_write(tmp_path / "w.csv", "stim1,condition\nThe,W\n"))


def test_fedorenko_2010_csv(tmp_path):
    rows = "".join(f"{k},text {c} {k},{c}\n" for k, c in enumerate("SWJNSWJN"))
    path = _write(tmp_path / "fed.csv", ",sentence,condition\n" + rows)
    s = stimsets.read_any(path)
    assert s.name == "localizer" and len(s.items) == 8
    assert [(it.text, it.labels["condition"], it.match) for it in s.items[:2]] == [("text S 0", "S", "0"),
                                                                                   ("text S 4", "S", "1")]
    assert set(s.contrasts) == {"localizer", "S_J", "W_N", "S_W", "J_N", "J_W"}
    assert s.contrasts["J_W"] == ("J", "W")


def test_moseley_word_list_and_contrasts_by_labels(tmp_path):
    words = [("dog", "concrete", "noun"), ("idea", "abstract", "noun"), ("grasp", "concrete", "verb"),
             ("think", "abstract", "verb"), ("cup", "concrete", "noun"), ("hope", "abstract", "verb")]
    path = _write(tmp_path / "moseley.csv", "word,category,class\n" + "".join(",".join(w) + "\n" for w in words))
    s = stimsets.read_any(path)
    assert [it.text for it in s.items] == [w for w, _, _ in words] and all(it.span is None for it in s.items)
    assert s.items[1].labels == {"concreteness": "abstract", "class": "noun"}
    assert set(s.contrasts) == {"concrete_noun_verb", "abstract_noun_verb", "abstract_concrete", "noun_verb"}
    pick = lambda side: [it.text for it, m in zip(s.items, s.matches(side)) if m]  # noqa: E731
    assert pick("concrete_noun") == ["dog", "cup"] == pick("concreteness=concrete&class=noun")
    assert pick("abstract_verb") == ["think", "hope"] and pick("verb") == ["grasp", "think", "hope"]
    assert pick("abstract") == ["idea", "think", "hope"]
    with pytest.raises(ValueError, match="'fruit' is no group or label of the set moseley"):
        s.matches("fruit")
    with pytest.raises(ValueError, match="line 2: category 'vague'"):
        stimsets.read_moseley(_write(tmp_path / "bad.csv", "word,category,class\nthing,vague,noun\n"))


def test_elli_two_word_items(tmp_path):
    path = _write(tmp_path / "elli.csv", "run,block,class,category,pair\n1,1,noun,manmade,the garage the rink\n"
                                         "1,2,verb,mouth,to chew to bite\n2,1,noun,bird,the crow the robin\n")
    s = stimsets.read_any(path)
    assert [it.text for it in s.items] == ["the garage the rink", "to chew to bite", "the crow the robin"]
    assert s.items[1].labels == {"class": "verb", "category": "mouth"} and s.contrasts == {"noun_verb": ("noun", "verb")}
    assert [it.sample for it in s.items] == ["row 2", "row 3", "row 4"]  # every pair is a sample
    with pytest.raises(ValueError, match="class 'noun' with category 'mouth'"):
        stimsets.read_elli(_write(tmp_path / "bad.csv", "run,block,class,category,pair\n1,1,noun,mouth,a b\n"))


SET = """# a set written by hand
# group concrete_noun = class=noun;concreteness=concrete
# contrast mine = concrete_noun - class=verb
text\tlabels\tframe\titem
apple\tclass=noun;concreteness=concrete\tThe next word is ___.\t
apple\tclass=noun;concreteness=concrete\tHe said ___ twice.\t
truth\tclass=noun;concreteness=abstract\tThe next word is ___.\t
run\tclass=verb;concreteness=concrete\tThe next word is ___.\t
think\tclass=verb;concreteness=abstract\tThe next word is ___.\t
think\tclass=verb;concreteness=abstract\tHe said ___ twice.\t
"""


def test_the_set_format_frames_targets_groups_contrasts(tmp_path):
    s = stimsets.read_set(_write(tmp_path / "mine.tsv", SET))
    assert s.name == "mine" and s.groups == {"concrete_noun": {"class": "noun", "concreteness": "concrete"}}
    assert s.contrasts == {"mine": ("concrete_noun", "class=verb")}
    first = s.items[1]
    assert first.text == "He said apple twice." and first.text[slice(*first.span)] == "apple"
    assert first.label == "mine.tsv line 6" and s.items[0].sample == first.sample != s.items[2].sample
    targets = stimsets.read_set(_write(tmp_path / "t.tsv", "text\tlabels\ttarget\nI ate an apple.\tclass=noun\tapple\n"
                                                         "The apple and the pie.\tclass=noun\tapple\n"))
    assert [it.text[slice(*it.span)] for it in targets.items] == ["apple", "apple"]
    assert targets.items[0].sample == targets.items[1].sample  # rows sharing a target word are one sample
    for text, match in (("text\tlabels\ttarget\nI ate.\tclass=noun\tpie\n", "'pie' is not a word"),
                        ("text\tlabels\nI ate.\tclass\n", "factor=level pairs"),
                        ("text\tlabel\nI ate.\tclass=noun\n", "columns text and labels"),
                        ("# contrast x = noun - fruit\ntext\tlabels\nI ate.\tclass=noun\n", "contrast x: the contrast "
                                                                                            "side 'fruit'"),
                        ("text\tlabels\tframe\nI\tclass=noun\tno slot\n", "needs one slot ___")):
        with pytest.raises(ValueError, match=match):
            stimsets.read_set(_write(tmp_path / "bad.tsv", text))


def test_a_sample_is_the_mean_over_its_frames_and_sides_select_by_labels(tmp_path):
    s = stimsets.read_set(_write(tmp_path / "mine.tsv", SET))
    loc = stimsets.read_shipped_localizer(STIMULI_DIR)
    contrasts = stimsets.select_contrasts([loc, s], "mine,concrete-abstract")
    assert [c.name for c in contrasts] == ["localizer", "mine", "concrete_vs_abstract"]
    stim = analysis.Stimuli([loc, s], [[[1]] * len(loc.items), [[1]] * len(s.items)],
                            [[(0, 1)] * len(loc.items), [(0, 1)] * len(s.items)], contrasts)
    resp = np.zeros((1, len(loc.items) + len(s.items), 2))
    resp[0, len(loc.items):, 0] = [1, 3, 10, 20, 30, 50]  # the rows of mine.tsv
    sides, left, conditions = analysis.contrast_sides(stim, resp)
    assert sides["mine"][0][0, :, 0].tolist() == [2.0]  # apple: the mean of its two frames
    assert sides["mine"][1][0, :, 0].tolist() == [20.0, 40.0]  # run, think (mean of 30, 50)
    assert sides["concrete_vs_abstract"][0][0, :, 0].tolist() == [2.0, 20.0]
    assert sides["concrete_vs_abstract"][1][0, :, 0].tolist() == [10.0, 40.0]
    assert set(conditions) == set("SWJN") and sides["localizer"][0].shape == (1, 96, 2)
    copy = stimsets.read_set(_write(tmp_path / "copy.tsv", SET.replace("contrast mine", "contrast yours")))
    with pytest.raises(ValueError, match="in 2 sets"):
        stimsets.select_contrasts([loc, s, copy], "noun-verb")
    with pytest.raises(ValueError, match="the sets mine and again both declare a contrast mine"):
        stimsets.select_contrasts([loc, s, stimsets.read_set(_write(tmp_path / "again.tsv", SET))], "")
    with pytest.raises(ValueError, match="no set declares this contrast"):
        stimsets.select_contrasts([loc, s], "nothing")


def test_planted_answer_a_smooth_field_is_autocorrelated_noise_is_not(monkeypatch, tmp_path):
    """Responses that carry a smooth field on the sheet for one factor (field=on vs off) and nothing for the
    other (half=a vs b): Moran's I of the first contrast's t-map is high, of the second about 0."""
    rows = "".join(f"item {k}\tfield={'on' if k % 2 else 'off'};half={'a' if k < 20 else 'b'}\n" for k in range(40))
    s = stimsets.read_set(_write(tmp_path / "planted.tsv", "text\tlabels\n" + rows))
    loc = stimsets.read_shipped_localizer(STIMULI_DIR)
    contrasts = stimsets.select_contrasts([loc, s], "on-off,a-b")
    stim = analysis.Stimuli([loc, s], [[[1]] * len(loc.items), [[1]] * len(s.items)],
                            [[(0, 1)] * len(loc.items), [(0, 1)] * len(s.items)], contrasts)
    xy = np.stack(np.meshgrid(np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 2)
    field = np.sin(xy[:, 0] / 3.0) + np.cos(xy[:, 1] / 4.0)
    rng = np.random.default_rng(0)

    def responses(model, ids, ranges, **kw):
        resp = rng.normal(size=(1, len(ids), len(xy)))
        on = np.array([it.labels.get("field") == "on" for it in loc.items + s.items])
        resp[0, on] += 2.0 * field
        return resp

    monkeypatch.setattr(analysis, "site_responses", responses)
    out, _ = analysis.stimulus_measures(None, stim)
    smooth = analysis.morans_i(out["t_on_vs_off"][0], xy, permutations=99)
    noise = analysis.morans_i(out["t_a_vs_b"][0], xy, permutations=99)
    assert smooth.i > 0.6 and smooth.p == 0.01
    assert abs(noise.i) < 0.15 and noise.p > 0.05


def test_analyze_runs_a_users_set_and_contrasts(gpt2_run, tmp_path):
    path = _write(tmp_path / "mine.tsv", SET)
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={gpt2_run.run}", f"out={out}", f"stimuli=stimuli,{path}",
                              "contrasts=verb_noun,mine,concrete-abstract,S_J", "permutations=9", "null_shuffles=2",
                              "heldout_tokens=256"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    units = np.load(out / "units.npz")
    assert units["contrasts"].tolist() == ["localizer", "verb_noun", "mine", "concrete_vs_abstract", "S_J"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stimuli"]["contrasts"]["mine"] == {"set": "mine", "sides": "concrete_noun - class=verb"}
    assert summary["stimuli"]["sets"]["mine"]["samples_in_file"] == 4
    assert summary["stimuli"]["sets"]["mine"]["per_label"]["class=verb"] == {"in_file": 2, "analysed": 2}
    assert summary["model"]["contrasts"]["S_J"] == "S - J"
    for name in ("mine", "concrete_vs_abstract", "S_J"):
        assert (out / f"{name}_maps.png").is_file()
        assert units[f"n_items_{name}"].tolist() == {"mine": [1, 2], "concrete_vs_abstract": [2, 2],
                                                     "S_J": [96, 96]}[name]
        assert set(summary["model"]["sites"]["layer.0.mlp"][name]) >= {"morans_i", "null_i"}
    # the contrast, measured here: every word read at its own tokens in each frame, averaged over its frames
    from topolm.checkpoint import load_model
    from topolm.tokenizer import gpt2_encoding
    model, _, _ = load_model(gpt2_run.run)
    s = stimsets.read_set(path)
    ids, ranges = analysis.tokenize_items([it.text for it in s.items], gpt2_encoding(), [it.span for it in s.items])
    resp = analysis.site_responses(model, ids, ranges, batch_size=1)
    words = {}
    for k, it in enumerate(s.items):
        words.setdefault(it.text[slice(*it.span)], []).append(k)
    assert [len(words[w]) for w in ("apple", "truth", "run", "think")] == [2, 1, 1, 2]
    mean = {w: resp[:, rows].mean(axis=1) for w, rows in words.items()}
    t, _ = analysis.welch_t(np.stack([mean["apple"], mean["run"]], 1).swapaxes(0, 1),
                            np.stack([mean["truth"], mean["think"]], 1).swapaxes(0, 1))
    np.testing.assert_allclose(units["t_concrete_vs_abstract"], t, rtol=1e-5)
    assert np.isnan(units["t_mine"]).all()  # one concrete noun: fewer than 2 samples on a side


def test_analyze_refuses_an_unknown_contrast_before_writing(tmp_path):
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={tmp_path / 'none'}", f"out={out}", "contrasts=fruit-veg"])
    one_error_line(proc, "contrasts=fruit-veg", "in no set")
    proc = run_main(analyze, [f"ckpt={tmp_path / 'none'}", f"out={out}", f"stimuli={tmp_path / 'gone.tsv'}"])
    one_error_line(proc, "stimuli=", "not found")
    assert not out.exists()


def test_analyze_runs_the_research_layouts_in_place_of_the_shipped_sets(gpt2_run, tmp_path):
    """An EvLab localizer CSV replaces the shipped localizer (its S - N is t_localizer, the profile has S and N
    only) and Moseley's word list runs its four declared contrasts."""
    words = ["dog", "cup", "idea", "hope", "run", "grab", "think", "seem", "milk", "fear"]
    sentences = [f"the {w} was here" for w in words[:6]]
    lists = [f"blorp {w} vang trisk" for w in words[:6]]
    evlab = _write(tmp_path / "langloc.csv", "stim1,stim2,stim3,stim4,condition\n" + "".join(
        ",".join(t.split()) + f",{c}\n" for c, texts in (("S", sentences), ("N", lists)) for t in texts))
    rows = [(w, cat, cls) for k, w in enumerate(words[:8]) for cat, cls in [(("concrete", "abstract")[k % 2],
                                                                               ("noun", "verb")[k // 4])]]
    moseley = _write(tmp_path / "moseley.csv", "word,category,class\n" + "".join(",".join(r) + "\n" for r in rows))
    out = tmp_path / "fig"
    proc = run_main(analyze, [f"ckpt={gpt2_run.run}", f"out={out}", f"stimuli={evlab},{moseley}", "contrasts=all",
                              "permutations=9", "null_shuffles=2", "heldout_tokens=256"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    units = np.load(out / "units.npz")
    assert units["contrasts"].tolist() == ["localizer", "concrete_noun_verb", "abstract_noun_verb", "abstract_concrete",
                                           "noun_verb"]
    assert units["n_items_localizer"].tolist() == [6, 6] and units["localizer_items"].tolist() == list(range(6))
    assert units["n_items_noun_verb"].tolist() == [4, 4] and units["n_items_concrete_noun_verb"].tolist() == [2, 2]
    from topolm.checkpoint import load_model
    from topolm.tokenizer import gpt2_encoding
    model, _, _ = load_model(gpt2_run.run)
    enc = gpt2_encoding()
    resp = {}
    for name, texts in (("S", sentences), ("N", lists), ("noun", words[:4]), ("verb", words[4:8])):
        ids = [enc.encode_ordinary(t) for t in texts]
        resp[name] = analysis.site_responses(model, ids, [(0, len(x)) for x in ids], batch_size=1).swapaxes(0, 1)
    # one item at a time here, in batches there: equal to float32 rounding (bit for bit on some CPUs only)
    np.testing.assert_allclose(units["t_localizer"], analysis.welch_t(resp["S"], resp["N"])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(units["t_noun_verb"], analysis.welch_t(resp["noun"], resp["verb"])[0], rtol=1e-5, atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    profile = summary["model"]["sites"]["layer.0.mlp"]["profile"]
    assert profile["W"] is None and profile["J"] is None
    assert summary["stimuli"]["localizer_items_in_file"] == 6 and "pos" not in summary["stimuli"]["sets"]


def test_a_set_named_localizer_is_read_as_the_localizer(tmp_path):
    rows = "".join(f"{c} text {k}\tcondition={c}\n" for c in "NS" for k in range(3))
    s = stimsets.as_localizer(stimsets.read_set(_write(tmp_path / "localizer.tsv", "text\tlabels\n" + rows)))
    assert [it.text for it in s.items[:2]] == ["S text 0", "S text 1"]  # ordered by condition, then item
    assert [it.match for it in s.items] == ["0", "1", "2"] * 2 and list(s.contrasts) == ["localizer"]
    shipped = stimsets.read_shipped_localizer(STIMULI_DIR)
    assert len(shipped.items) == 4 * 96 and set(shipped.contrasts) == set(stimsets.LOCALIZER_CONTRASTS)
    assert shipped.items[96 * 3 + 30].label == "localizer item 30 of condition N"
    for text, match in (("S a\tcondition=S\nS b\tcondition=S\nN a\tcondition=N\n", "the same items"),
                        ("S a\tcondition=S\nW a\tcondition=W\n", "needs the conditions S and N"),
                        ("S a\tcondition=S\nN a\tclass=noun\n", "labelled condition=S, W, J or N")):
        with pytest.raises(ValueError, match=match):
            stimsets.as_localizer(stimsets.read_set(_write(tmp_path / "localizer.tsv", "text\tlabels\n" + text)))


def test_the_documented_example_is_a_set(tmp_path):
    from conftest import REPO
    doc = (REPO / "docs" / "analysis.md").read_text(encoding="utf-8")
    block = doc.split("# group concrete_noun", 1)[1].split("```", 1)[0]
    s = stimsets.read_set(_write(tmp_path / "example.tsv", "# group concrete_noun" + block))
    assert len(s.items) == 4 and len({it.sample for it in s.items}) == 3 and "mine" in s.contrasts
    assert [it.text for it, m in zip(s.items, s.matches("concrete_noun")) if m] == ["The next word is apple.",
                                                                                     "He said apple twice."]
