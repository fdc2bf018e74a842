"""Batches for scoring and measuring: sequences of one exact length per forward pass, never padded.

Every scoring path (BLiMP, the validation loss, the analysis' responses) runs sequences through
the model in batches, and an item's number must not depend on which batch it lands in:

- No padding. A batch holds sequences of exactly one length, so no pad id enters an embedding,
  a softmax or a reduction. (A pad id of probability 0, such as id 0 under a restricted output
  vocabulary, has log-probability -inf, and -inf x 0 is NaN: a masked sum must select, never
  multiply. Even a selected sum of a padded batch differs in its low bits from the same sequence
  alone, since the padded shape changes how the kernels split their work.)
- Enough rows. CPU BLAS (MKL's sgemm, measured) rounds a matrix product of fewer than about a
  dozen rows through other kernels than a larger one, so the same row gives other low bits when
  it is multiplied alone. A forward pass of B sequences of T tokens multiplies B*T rows; a batch
  with fewer than MIN_ROWS rows is filled up with copies of its own sequences (their results are
  discarded), so every row goes through the same kernels at every batch size. Attention, layer
  norm and the elementwise layers compute each sequence on its own. With both, a sequence's
  numbers on the CPU are bit-identical at every batch size (tested); on CUDA the kernels are
  chosen by shape too, and numbers agree to float32 rounding, not bit for bit.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

MIN_ROWS = 64  # rows (sequences x tokens) of the smallest forward pass; well above MKL's small-matrix range


def length_batches(lengths, batch_size: int) -> Iterator[np.ndarray]:
    """Indices into `lengths` in batches of one exact length and at most `batch_size` items.

    Longest lengths first (the first batch shows the memory peak), items of a length in their
    given order. Every index appears in exactly one batch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for length in np.unique(lengths)[::-1]:
        same = np.flatnonzero(lengths == length)
        for start in range(0, len(same), batch_size):
            yield same[start:start + batch_size]


def filled(index: np.ndarray, length: int) -> np.ndarray:
    """`index` followed by copies of its own entries, cyclically, until the batch has >= MIN_ROWS rows
    of `length` tokens (at least `index` itself). The first len(index) rows are the batch's own."""
    index = np.asarray(index)
    n = max(len(index), -(-MIN_ROWS // max(int(length), 1)))
    return np.resize(index, n)
