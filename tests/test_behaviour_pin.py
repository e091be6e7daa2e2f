"""Behaviour pinned across refactors: greedy tokens and logits on the tiny preset.

The expected values in tests/data/behaviour_pin.json were produced by the
engine before the module reorganisation of issue #8 (tools/pin_behaviour.py
writes them); any change of arithmetic, routing or generation shows up here.
Tokens must match exactly. fp32 logits to 1e-5 relative (the numba kernels
may contract differently on AVX2 and AVX-512 hosts, or another numba/LLVM
version). bf16-mode logits are rounded to bf16 at the end, so such an fp32
difference can flip the last bit of a logit: each may differ from the pin by
at most one bf16 ulp of its value (plus the pin's rounding to 6 decimals), and
at most 1% of them may differ at all
(the structural mistakes a pin guards against move logits by 13-90%).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from pin_behaviour import CASES, run_case

EXPECTED = json.loads((Path(__file__).parent / "data" / "behaviour_pin.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_behaviour_unchanged(case, tiny_cfg, tiny_ckpt, tmp_path_factory):
    got = run_case(case, tiny_cfg, tiny_ckpt, tmp_path_factory.mktemp(case))
    want = EXPECTED[case]
    assert got["tokens"] == want["tokens"]
    logits, ref = np.array(got["logits"]), np.array(want["logits"])
    if case.endswith("-fp32"):
        assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
        return
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)     # bf16 ulp
    diff = np.abs(logits - ref)
    # + 1e-6: both sides are rounded to 6 decimals (run_case), so one bf16 ulp of a
    # small logit can read as a little more (1.05 ulps of -0.000534 on an Intel host)
    assert np.all(diff <= ulp * 1.0001 + 1e-6) and np.mean(diff > 0) <= 0.01
