"""The pre-optimization corpus: short nonce / jabberwocky-style sentences, tokenized to train.bin.

    python init-data/prepare.py               # tokenize sentences.txt -> train.bin
    python init-data/prepare.py --regenerate  # rewrite sentences.txt from the grammar below first

Sentences keep real English function words and morphology but use invented content words
("the brillig tove has gimbled a mome rath"), so that activations reflect syntax more than
lexical meaning. The grammar is seeded: --regenerate reproduces the shipped sentences.txt.
"""
import argparse
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import EOT_TOKEN, cli_main, gpt2_encoding  # noqa: E402
from corpus import ArgumentParser, TokenFiles, positive_int, read_text_file, seed_int  # noqa: E402

NOUNS = ["tove", "rath", "borogove", "wabe", "jubjub", "bandersnatch", "slithe", "frumious", "tulgey", "snark",
         "blicket", "dax", "wug", "fep", "zorp", "glim", "trandle", "mirk", "plonth", "quib", "vrell", "skarn",
         "drindle", "flomp", "grendle", "kerf", "lumbet", "nox", "pelch", "sprock"]
ADJECTIVES = ["brillig", "slithy", "mimsy", "mome", "uffish", "vorpal", "manxome", "beamish", "frabjous", "gleeby",
              "tropsy", "wendish", "plorky", "sneevy", "quindle", "farny", "blashy", "crunty"]
VERBS = ["gyre", "gimble", "outgrabe", "burble", "chortle", "galumph", "snicker", "blorf", "crindle", "dwell",
         "flink", "grop", "hesk", "jarn", "mib", "norgle", "plim", "skree", "tarn", "wimble"]
ADVERBS = ["frumiously", "uffishly", "mimsily", "vorpally", "blithely", "snarkily", "gleebily", "tropsily"]
DETERMINERS = ["the", "a", "every", "some", "this", "that", "no", "each"]
PREPOSITIONS = ["in", "on", "under", "near", "beside", "through", "with", "behind", "above", "across"]
SUBJECTS = ["she", "he", "they", "we", "it", "nobody", "everyone"]
AUXILIARIES = ["will", "can", "should", "might", "must", "could"]
CONNECTIVES = ["because", "while", "although", "when", "after", "before", "if"]


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def past(verb: str) -> str:
    return verb + ("d" if verb.endswith("e") else "ed")


def third(verb: str) -> str:
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x")) else "s")


def noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    many = rng.random() < 0.35
    noun = plural(rng.choice(NOUNS)) if many else rng.choice(NOUNS)
    det = rng.choice(["the", "some", "these", "those", "many"]) if many else rng.choice(DETERMINERS)
    words = [det] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.6 else []) + [noun]
    if rng.random() < 0.2:
        words += [rng.choice(PREPOSITIONS), "the", rng.choice(NOUNS)]
    return " ".join(words), many


def clause(rng: random.Random) -> str:
    if rng.random() < 0.3:
        subject, many = rng.choice(SUBJECTS), None
    else:
        subject, many = noun_phrase(rng)
    verb = rng.choice(VERBS)
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
        tail = " " + noun_phrase(rng)[0]
    elif choice < 0.7:
        tail = f" {rng.choice(PREPOSITIONS)} {noun_phrase(rng)[0]}"
    elif choice < 0.85:
        tail = " " + rng.choice(ADVERBS)
    return f"{subject} {pred}{tail}"


def sentence(rng: random.Random) -> str:
    text = clause(rng)
    if rng.random() < 0.25:
        text += f" {rng.choice(CONNECTIVES)} {clause(rng)}"
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"] if rng.random() < 0.2 else ["."])


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regenerate", action="store_true", help="rewrite sentences.txt from the grammar")
    parser.add_argument("--sentences", type=positive_int, default=6000, help="sentences to generate with --regenerate")
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args(argv)
    text_file = HERE / "sentences.txt"
    if args.regenerate or not text_file.exists():
        rng = random.Random(args.seed)
        text = "\n".join(sentence(rng) for _ in range(args.sentences)) + "\n"
        tmp = text_file.with_name(f"{text_file.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, text_file)
    enc = gpt2_encoding()
    with TokenFiles(HERE, ("train",)) as out:
        for line in read_text_file(text_file).splitlines():
            if line.strip():
                out.write("train", enc.encode_ordinary(line) + [EOT_TOKEN])
        out.commit({"source": "init-data/sentences.txt (jabberwocky-style sentences)"})
    print(f"train.bin: {out.counts['train']:,} tokens from {text_file.name}")


if __name__ == "__main__":
    cli_main(main)
