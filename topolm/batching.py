"""Batches for scoring and measuring: sequences of one exact length per forward pass, never padded.

Every scoring path (BLiMP, the validation loss, the analysis' responses) runs sequences through
the model in batches, and an item's number must not depend on which batch it lands in:

- No padding. A batch holds sequences of exactly one length, so no pad id enters an embedding,
  a softmax or a reduction. (A pad id of probability 0, such as id 0 under a restricted output
  vocabulary, has log-probability -inf, and -inf x 0 is NaN: a masked sum must select, never
  multiply. Even a selected sum of a padded batch differs in its low bits from the same sequence
  alone, since the padded shape changes how the kernels split their work.)
- Enough rows. CPU BLAS (MKL's sgemm, measured) rounds a matrix product of few rows through
  other kernels than a larger one, so the same row gives other low bits when it is multiplied
  alone; how few grows with the threads (up to 11 rows at 2 threads, 27 at 16, 171 at 64). A
  forward pass of B sequences of T tokens multiplies B*T rows; a batch with fewer than
  `min_rows()` rows is filled up with copies of its own sequences (their results are discarded).
- One attention kernel. PyTorch's fused CPU attention rounds a sequence differently depending on
  which thread computes it, and so on the batch it is in (measured: 2 heads of 8, 13 tokens);
  `invariant_kernels` runs the math kernel on the CPU instead (matrix products and a softmax,
  each sequence on its own).
With these, a sequence's numbers on the CPU are bit-identical at every batch size (tested at
1, 3, 7 and the default) on the CPUs measured; on one AMD EPYC a tiny model (6 x 6 sheets) gave an item
alone and in a batch of 6 responses 7e-9 apart at one site: equal to float32 rounding, not bit for bit. On CUDA the kernels are chosen by shape too: numbers agree to float32
rounding there, not bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def min_rows() -> int:
    """Rows (sequences x tokens) of the smallest forward pass: above MKL's small-matrix range at the
    current number of threads (measured up to 64 threads: at most 171 rows there)."""
    return max(64, 4 * torch.get_num_threads())


@contextmanager
def invariant_kernels(device) -> Iterator[None]:
    """Within the block, attention on the CPU runs PyTorch's math kernel (the same for every batch
    and thread); elsewhere the default kernels."""
    if torch.device(device).type != "cpu":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


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
    """`index` followed by copies of its own entries, cyclically, until the batch has at least
    `min_rows()` rows of `length` tokens. The first len(index) rows are the batch's own."""
    index = np.asarray(index)
    n = max(len(index), -(-min_rows() // max(int(length), 1)))
    return np.resize(index, n)
