"""The pre-optimization corpus: short nonce / jabberwocky-style sentences, tokenized to train.bin.

    python init-data/prepare.py               # tokenize sentences.txt -> train.bin
    python init-data/prepare.py --regenerate  # rewrite sentences.txt from the grammar below first

Sentences keep real English function words and morphology but use invented content words
("the brillig tove has gimbled a mome rath"), so that activations reflect syntax more than
lexical meaning. The content words are nonwords from the project's shared generator
(`topolm.stimuli.nonwords`, checked against wordfreq's English list; --regenerate needs wordfreq,
from requirements-dev.txt). Grammar and vocabulary are seeded: --regenerate reproduces the
shipped sentences.txt. The tokenization is `topolm.corpus.tokenize_sentences`, which init_pos.py
also runs when train.bin is missing.
"""
import argparse
import random
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from topolm.config import cli_main
from topolm.files import atomic_write  # noqa: E402
from topolm.corpus import ArgumentParser, positive_int, seed_int, tokenize_sentences  # noqa: E402
from topolm.stimuli import nonwords, past, plural  # noqa: E402

third = plural  # third-person singular: the same -s/-es rule

# The nonce vocabulary: pronounceable nonwords from the project's shared generator
# (topolm.stimuli.nonwords), none of whose inflected forms is an English word (checked with wordfreq).
# Drawn only when sentences.txt is (re)generated.
N_NOUNS, N_ADJECTIVES, N_VERBS, N_ADVERBS = 30, 18, 20, 8
VOCABULARY_SEED = 11
DETERMINERS = ["the", "a", "every", "some", "this", "that", "no", "each"]
PREPOSITIONS = ["in", "on", "under", "near", "beside", "through", "with", "behind", "above", "across"]
SUBJECTS = ["she", "he", "they", "we", "it", "nobody", "everyone"]
AUXILIARIES = ["will", "can", "should", "might", "must", "could"]
CONNECTIVES = ["because", "while", "although", "when", "after", "before", "if"]


def vocabulary(seed: int = VOCABULARY_SEED) -> dict[str, list[str]]:
    """Nonce nouns, adjectives, verbs (stems) and adverbs (stem + -ly), from topolm.stimuli.nonwords."""
    stems = nonwords(N_NOUNS + N_ADJECTIVES + N_VERBS + N_ADVERBS, seed=seed)
    cuts = np.cumsum([N_NOUNS, N_ADJECTIVES, N_VERBS])
    nouns, adjectives, verbs, adverbs = np.split(np.array(stems), cuts)
    return {"nouns": nouns.tolist(), "adjectives": adjectives.tolist(), "verbs": verbs.tolist(),
            "adverbs": [a + "ly" for a in adverbs]}


def noun_phrase(rng: random.Random, vocab: dict) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    many = rng.random() < 0.35
    noun = plural(rng.choice(vocab["nouns"])) if many else rng.choice(vocab["nouns"])
    det = rng.choice(["the", "some", "these", "those", "many"]) if many else rng.choice(DETERMINERS)
    words = [det] + ([rng.choice(vocab["adjectives"])] if rng.random() < 0.6 else []) + [noun]
    if rng.random() < 0.2:
        words += [rng.choice(PREPOSITIONS), "the", rng.choice(vocab["nouns"])]
    return " ".join(words), many


def clause(rng: random.Random, vocab: dict) -> str:
    if rng.random() < 0.3:
        subject, many = rng.choice(SUBJECTS), None
    else:
        subject, many = noun_phrase(rng, vocab)
    verb = rng.choice(vocab["verbs"])
    form = rng.random()
    if form < 0.35:
        pred = past(verb)
    elif form < 0.6:
        pred = f"{rng.choice(AUXILIARIES)} {verb}"
    elif form < 0.8:
        singular = many is False or subject in ("she", "he", "it", "nobody", "everyone")
        pred = third(verb) if singular else verb
    else:
        singular = many is False or subject in ("she", "he", "it", "nobody", "everyone")
        pred = f"{'has' if singular else 'have'} {past(verb)}"
    tail = ""
    choice = rng.random()
    if choice < 0.45:
        tail = " " + noun_phrase(rng, vocab)[0]
    elif choice < 0.7:
        tail = f" {rng.choice(PREPOSITIONS)} {noun_phrase(rng, vocab)[0]}"
    elif choice < 0.85:
        tail = " " + rng.choice(vocab["adverbs"])
    return f"{subject} {pred}{tail}"


def sentence(rng: random.Random, vocab: dict) -> str:
    text = clause(rng, vocab)
    if rng.random() < 0.25:
        text += f" {rng.choice(CONNECTIVES)} {clause(rng, vocab)}"
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"] if rng.random() < 0.2 else ["."])


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help="rewrite sentences.txt from the grammar")
    parser.add_argument("--sentences", type=positive_int, default=6000, help="sentences to generate with --regenerate")
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args(argv)
    text_file = HERE / "sentences.txt"
    if args.regenerate or not text_file.exists():
        rng, vocab = random.Random(args.seed), vocabulary()
        atomic_write(text_file, "\n".join(sentence(rng, vocab) for _ in range(args.sentences)) + "\n")
    n_tokens = tokenize_sentences(text_file, HERE)
    print(f"train.bin: {n_tokens:,} tokens from {text_file.name}")


if __name__ == "__main__":
    cli_main(main)
