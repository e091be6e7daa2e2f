"""tools/membw.py: the benchmarks' plain reads sum every word once, on any thread count."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import membw  # noqa: E402


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_threaded_sum_reads_every_word_once(threads):
    """Parts that do not divide the buffer, and uint64 sums that wrap, as numpy's own."""
    rng = np.random.default_rng(threads)
    a = rng.integers(0, 2**64 - 1, 1001, dtype=np.uint64, endpoint=True)
    assert membw.threaded_sum(a, threads) == a.sum()
    assert membw.threaded_sum(np.arange(10, dtype=np.uint64), threads) == 45

