"""Scoring a language model on BLiMP minimal pairs (validation loss and ablation: topolm.ablation).

BLiMP (Warstadt et al. 2020): 67 paradigms x 1000 minimal pairs, each a
grammatical and an ungrammatical sentence. A sentence's score is its total log-probability
given a leading `<|endoftext|>`: sum over its tokens t of log p(token_t | <|endoftext|>, tokens < t).
By default the sentence is tokenized as it is; with `leading_space=True` it is tokenized as
`" " + sentence`, the convention of lm-eval's `blimp` task (its empty context and the target
delimiter " "; tested against lm-eval 0.4.13). The two conventions give different tokens for the
first word, so their scores differ, and so can individual decisions. A pair is correct when the
grammatical sentence scores strictly higher (a tie counts as wrong). Sentences are scored in
batches of one exact length (topolm.batching: no padding; the same scores at every batch size). A model with a restricted
output vocabulary (output_vocab=corpus) gives probability 0 to every other id: a pair with such a
token in either sentence is not scorable, counted as such and left out of the accuracy. A NaN
score is an error, never a number in a report. Accuracy is reported per paradigm (BLiMP's
`UID`), per phenomenon (its `linguistics_term`, 12 in BLiMP) and overall: the fraction of the
scorable pairs, and the mean over paradigms (equal when every paradigm has the same number of
scorable pairs, as in BLiMP with a full vocabulary).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from topolm.batching import filled, invariant_kernels, length_batches
from topolm.tokenizer import EOT_TOKEN
from topolm.config import InferenceKeys, UserError, require
from topolm.files import read_jsonl, require_text_fields
from topolm.hub import load_hub_dataset

# The 67 paradigms of BLiMP (nyu-mll/blimp configurations; the jsonl names of github.com/alexwarstadt/blimp).
BLIMP_PARADIGMS = (
    "adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement", "animate_subject_passive",
    "animate_subject_trans", "causative", "complex_NP_island", "coordinate_structure_constraint_complex_left_branch",
    "coordinate_structure_constraint_object_extraction", "determiner_noun_agreement_1", "determiner_noun_agreement_2",
    "determiner_noun_agreement_irregular_1", "determiner_noun_agreement_irregular_2",
    "determiner_noun_agreement_with_adj_2", "determiner_noun_agreement_with_adj_irregular_1",
    "determiner_noun_agreement_with_adj_irregular_2", "determiner_noun_agreement_with_adjective_1",
    "distractor_agreement_relational_noun", "distractor_agreement_relative_clause", "drop_argument",
    "ellipsis_n_bar_1", "ellipsis_n_bar_2", "existential_there_object_raising", "existential_there_quantifiers_1",
    "existential_there_quantifiers_2", "existential_there_subject_raising", "expletive_it_object_raising",
    "inchoative", "intransitive", "irregular_past_participle_adjectives", "irregular_past_participle_verbs",
    "irregular_plural_subject_verb_agreement_1", "irregular_plural_subject_verb_agreement_2",
    "left_branch_island_echo_question", "left_branch_island_simple_question", "matrix_question_npi_licensor_present",
    "npi_present_1", "npi_present_2", "only_npi_licensor_present", "only_npi_scope", "passive_1", "passive_2",
    "principle_A_c_command", "principle_A_case_1", "principle_A_case_2", "principle_A_domain_1",
    "principle_A_domain_2", "principle_A_domain_3", "principle_A_reconstruction",
    "regular_plural_subject_verb_agreement_1", "regular_plural_subject_verb_agreement_2",
    "sentential_negation_npi_licensor_present", "sentential_negation_npi_scope", "sentential_subject_island",
    "superlative_quantifiers_1", "superlative_quantifiers_2", "tough_vs_raising_1", "tough_vs_raising_2",
    "transitive", "wh_island", "wh_questions_object_gap", "wh_questions_subject_gap",
    "wh_questions_subject_gap_long_distance", "wh_vs_that_no_gap", "wh_vs_that_no_gap_long_distance",
    "wh_vs_that_with_gap", "wh_vs_that_with_gap_long_distance",
)
BLIMP_HUB = "nyu-mll/blimp"
SENTENCE_FIELDS = ("sentence_good", "sentence_bad")  # each non-empty text in every row
BLIMP_OFFLINE = "pass data_dir=<folder of <paradigm>.jsonl files> to read BLiMP from local files"


# ============================================================================= BLiMP data

@dataclass
class BlimpKeys(InferenceKeys):
    """The keys blimp.py and ablate.py share: which BLiMP pairs and how they are batched (ckpt and device
    from topolm.config.InferenceKeys)."""
    data_dir: str = ""
    """BLiMP: folder of <paradigm>.jsonl files (BLiMP's fields); empty loads nyu-mll/blimp through datasets."""
    paradigms: str = ""
    """Comma-separated BLiMP paradigm names; empty scores all of them."""
    batch_size: int = 64
    """BLiMP sentences per forward pass."""
    leading_space: bool = False
    """Score `" " + sentence` after <|endoftext|>, as lm-eval's `blimp` task does; false (the default)
    scores the sentence as it is written."""

    def __post_init__(self):
        super().__post_init__()
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")


@dataclass
class MinimalPairs:
    """Minimal pairs, one entry per pair: the paradigm (UID), phenomenon (linguistics_term), field,
    and the grammatical (good) and ungrammatical (bad) sentence."""
    paradigm: list[str]
    phenomenon: list[str]
    field: list[str]
    good: list[str]
    bad: list[str]

    def __len__(self) -> int:
        return len(self.good)

    def extend(self, rows: Iterable[tuple[str, dict]], paradigm: str) -> None:
        """Append (where, row) pairs; `where` names the row in errors ("<file> line 3"). Raises UserError for a
        row whose sentence_good or sentence_bad is missing, not text or empty."""
        for where, row in rows:
            require_text_fields(row, SENTENCE_FIELDS, where)
            self.paradigm.append(str(row.get("UID") or paradigm))
            self.phenomenon.append(str(row.get("linguistics_term") or "(none)"))
            self.field.append(str(row.get("field") or "(none)"))
            self.good.append(row["sentence_good"])
            self.bad.append(row["sentence_bad"])


def parse_paradigms(text: str, available: Iterable[str]) -> list[str]:
    """`text` is empty (all of `available`) or a comma-separated list of paradigm names; unknown names refused."""
    available = list(available)
    if not text.strip():
        return available
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    if not chosen:
        raise UserError(f"paradigms='{text}' names no paradigm; leave it empty for all, or list names separated by commas")
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise UserError(f"unknown BLiMP paradigm(s) {', '.join(unknown)}; available: {', '.join(available[:8])}"
                        f"{', ...' if len(available) > 8 else ''}")
    return list(dict.fromkeys(chosen))


def load_blimp_local(folder: Path, paradigms: str = "") -> MinimalPairs:
    """Minimal pairs from `folder/<paradigm>.jsonl` files (BLiMP's own jsonl, or rows of nyu-mll/blimp
    written as jsonl): one JSON object per line with sentence_good and sentence_bad, and optionally
    UID (default: the file name), linguistics_term and field. Read by `topolm.files.read_jsonl` (strict
    UTF-8, lines split at line feeds only, no escaped lone surrogates).

    Raises UserError for a missing folder, no jsonl files, unknown paradigms, bad lines, and a sentence
    that is missing or empty (naming the file, line and field)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"BLiMP folder not found: {folder}")
    files = {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    if not files:
        raise UserError(f"no <paradigm>.jsonl files in {folder}")
    pairs = MinimalPairs([], [], [], [], [])
    for name in parse_paradigms(paradigms, files):
        rows = [(f"{files[name]} line {n}", row) for n, row in read_jsonl(files[name], SENTENCE_FIELDS)]
        if not rows:
            raise UserError(f"{files[name]} holds no pairs")
        pairs.extend(rows, name)
    return pairs


def load_blimp_hub(paradigms: str = "", progress: bool = True) -> MinimalPairs:
    """Minimal pairs of nyu-mll/blimp (topolm.hub: the local cache first, then the Hub). Raises UserError in
    one line when a paradigm is neither cached nor reachable (offline: within seconds), or a row is empty."""
    from tqdm import tqdm

    pairs = MinimalPairs([], [], [], [], [])
    names = parse_paradigms(paradigms, BLIMP_PARADIGMS)
    # The first paradigm before the progress bar: a refusal (offline, not cached) is then the only line printed.
    first = load_hub_dataset(BLIMP_HUB, names[0], split="train", offline_key=BLIMP_OFFLINE)
    for name in tqdm(names, desc="loading BLiMP", disable=not progress):
        rows = first if name == names[0] else load_hub_dataset(BLIMP_HUB, name, split="train",
                                                               offline_key=BLIMP_OFFLINE)
        pairs.extend(((f"{BLIMP_HUB}/{name} row {n}", row) for n, row in enumerate(rows, 1)), name)
    return pairs


# ============================================================================= scoring

def encode_sentences(sentences: list[str], encoding, leading_space: bool = False) -> list[list[int]]:
    """Token ids of each sentence after a leading <|endoftext|> (GPT-2 BPE; special tokens in text are plain
    text); with `leading_space`, of `" " + sentence` (lm-eval's convention)."""
    prefix = " " if leading_space else ""
    return [[EOT_TOKEN] + encoding.encode_ordinary(prefix + s) for s in sentences]


def gpt_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits (B, T, vocab) at every position of our GPT, spatial loss off (-inf outside a restricted
    output vocabulary, as in the model's own forward)."""
    def logits(idx: torch.Tensor) -> torch.Tensor:
        hidden, _ = model.encode(idx, spatial=False)
        return model.output_logits(hidden)
    return logits


def producible(model, seqs: list[list[int]]) -> np.ndarray:
    """(n,) bool: True where every scored token (1..) of a sequence lies in the model's output vocabulary
    (always, for the full softmax; with a restricted one, GPTConfig.n_output_ids, the ids in `output_ids`)."""
    if not model.config.n_output_ids:
        return np.ones(len(seqs), dtype=bool)
    ids = model.output_ids.cpu().numpy()
    return np.array([bool(np.isin(s[1:], ids).all()) for s in seqs], dtype=bool)


@torch.no_grad()
def sequence_logprobs(logits_fn: Callable[[torch.Tensor], torch.Tensor], seqs: list[list[int]], batch_size: int,
                      device: str = "cpu", max_len: int | None = None, progress: bool = False,
                      desc: str = "scoring", label: Callable[[int], str] | None = None) -> np.ndarray:
    """Total log-probability of tokens 1.. of each sequence given the tokens before them (float64, (n,)).

    Sequences run in batches of one exact length (topolm.batching: no padding, and the same
    numbers at every batch size, bit for bit on the CPU); each sequence's token log-probabilities
    (float32 log-softmax) are summed in float64. A token of probability 0 (outside a restricted
    output vocabulary) makes its sequence -inf. Raises UserError for a sequence longer than
    `max_len` or shorter than 2, and for a NaN log-probability (named by `label(i)`, default
    "sequence i"): a NaN is never a score."""
    from tqdm import tqdm

    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if len(seqs) and lengths.min() < 2:
        raise UserError(f"sentence {int(np.argmin(lengths))} has no tokens to score")
    if max_len is not None and len(seqs) and lengths.max() > max_len:
        raise UserError(f"a sentence of {int(lengths.max())} tokens (with <|endoftext|>) exceeds the model's "
                        f"block_size={max_len}")
    out = np.zeros(len(seqs), dtype=np.float64)
    for index in tqdm(list(length_batches(lengths, batch_size)), desc=desc, unit="batch", disable=not progress):
        rows = filled(index, int(lengths[index[0]]))
        idx = torch.tensor([seqs[i] for i in rows], dtype=torch.long, device=device)
        with invariant_kernels(device):
            logits = logits_fn(idx)[:len(index), :-1]
        logp = F.log_softmax(logits.float(), dim=-1)
        token_lp = logp.gather(-1, idx[:len(index), 1:, None]).squeeze(-1)  # (B, T-1): log p(token t | tokens < t)
        out[index] = token_lp.double().sum(dim=1).cpu().numpy()
    nan = np.flatnonzero(np.isnan(out))
    if len(nan):
        what = label(int(nan[0])) if label else f"sequence {int(nan[0])}"
        raise UserError(f"the log-probability of {what} is NaN ({len(nan)} of {len(seqs)} are): the model's outputs "
                        f"are not numbers (NaN or inf in its weights?); no score was written")
    return out


def blimp_results(pairs: MinimalPairs, lp_good: np.ndarray, lp_bad: np.ndarray,
                  scorable: np.ndarray | None = None) -> dict:
    """Accuracy per paradigm, per phenomenon and overall (fraction of pairs, and mean over paradigms).

    scorable: (n_pairs,) bool, default all; a pair that is not scorable is counted (`not_scorable`)
    and left out of every accuracy. An accuracy with no scorable pair is None; `paradigm_mean`
    averages the paradigms that have one. `ties`: scorable pairs with equal scores (counted wrong)."""
    scorable = np.ones(len(pairs), dtype=bool) if scorable is None else np.asarray(scorable, dtype=bool)
    correct = (np.asarray(lp_good) > np.asarray(lp_bad)) & scorable
    paradigm, phenomenon = np.array(pairs.paradigm), np.array(pairs.phenomenon)

    def accuracy(selected: np.ndarray) -> dict:
        n, scored = int(selected.sum()), int((selected & scorable).sum())
        return {"accuracy": int(correct[selected].sum()) / scored if scored else None, "n": n,
                "not_scorable": n - scored}

    per_paradigm = {k: accuracy(paradigm == k) for k in dict.fromkeys(paradigm.tolist())}
    for name, entry in per_paradigm.items():
        first = int(np.argmax(paradigm == name))
        entry["phenomenon"], entry["field"] = pairs.phenomenon[first], pairs.field[first]
    defined = [e["accuracy"] for e in per_paradigm.values() if e["accuracy"] is not None]
    return {
        "overall": {**accuracy(np.ones(len(pairs), dtype=bool)),
                    "paradigm_mean": float(np.mean(defined)) if defined else None,
                    "ties": int(((np.asarray(lp_good) == np.asarray(lp_bad)) & scorable).sum())},
        "phenomena": {k: accuracy(phenomenon == k) for k in dict.fromkeys(phenomenon.tolist())},
        "paradigms": per_paradigm,
    }


def score_blimp(model, pairs: MinimalPairs, encoding, batch_size: int, device: str, progress: bool = True,
                leading_space: bool = False) -> dict:
    """BLiMP results of our GPT on `pairs`, with each pair's log-probabilities (`lp_good`, `lp_bad`) and
    whether it is scorable (`scorable`); `leading_space` scores `" " + sentence` (encode_sentences).

    A pair is scorable when both sentences' tokens lie in the model's output vocabulary: with a
    restricted one (output_vocab=corpus) a sentence holding another id has probability 0 (-inf),
    and a comparison with it would measure which words the training corpus held, not the model's
    grammar. Raises UserError for a NaN score, for a -inf score of a sentence whose every token is
    in the vocabulary, and when no pair is scorable."""
    n = len(pairs)
    sentences = pairs.good + pairs.bad
    seqs = encode_sentences(sentences, encoding, leading_space)

    def label(i: int) -> str:
        k = i % n
        return f"{pairs.paradigm[k]} pair {k + 1}'s {'grammatical' if i < n else 'ungrammatical'} {sentences[i]!r}"
    lp = sequence_logprobs(gpt_logits(model), seqs, batch_size, device, model.config.block_size, progress,
                           desc=f"BLiMP ({n} pairs)", label=label)
    ok = producible(model, seqs)
    lost = np.flatnonzero(ok & ~np.isfinite(lp))
    if len(lost):
        raise UserError(f"the log-probability of {label(int(lost[0]))} is {lp[lost[0]]} although every token is in the "
                        f"model's output vocabulary: the model's outputs are not finite")
    scorable = ok[:n] & ok[n:]
    if n and not scorable.any():
        raise UserError(f"none of the {n} pairs is scorable: each holds a token outside the model's output vocabulary "
                        f"of {model.config.n_output_ids} ids (trained with output_vocab=corpus); score a model trained "
                        f"with output_vocab=full")
    lp_good, lp_bad = lp[:n], lp[n:]
    return {**blimp_results(pairs, lp_good, lp_bad, scorable), "lp_good": lp_good, "lp_bad": lp_bad,
            "scorable": scorable}


def blimp_table(results: dict) -> str:
    """The results as a text table: paradigms grouped by phenomenon, then phenomena, then overall; an
    accuracy without a scorable pair shows as '-'."""
    width = max([len(p) for p in results["paradigms"]] + [len(p) for p in results["phenomena"]] + [24])

    def line(name: str, e: dict, n: int | None = None) -> str:
        acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.4f}"
        return f"{name:<{width}}  {acc:>8}  {e['n'] if n is None else n:6d}  {e.get('not_scorable', 0):12d}"
    head = f"{'accuracy':>8}  {'pairs':>6}  {'not scorable':>12}"
    lines = [f"{'paradigm':<{width}}  {head}", "-" * (width + 32)]
    for phen in results["phenomena"]:
        lines += [line(name, e) for name, e in results["paradigms"].items() if e["phenomenon"] == phen]
    lines += ["", f"{'phenomenon':<{width}}  {head}", "-" * (width + 32)]
    lines += [line(p, e) for p, e in results["phenomena"].items()]
    o = results["overall"]
    mean = {"accuracy": o["paradigm_mean"], "not_scorable": 0}
    lines += ["", line("overall (all pairs)", o), line(f"mean over paradigms ({len(results['paradigms'])})", mean, o["n"])]
    if o["not_scorable"]:
        lines.append(f"{o['not_scorable']} of {o['n']} pairs not scorable: a sentence holds a token outside the model's "
                     f"output vocabulary (output_vocab=corpus); left out of every accuracy")
    return "\n".join(lines)
