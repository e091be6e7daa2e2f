"""tools/bench_serve.py's arithmetic over rounds: each level's ratio to one stream is the
median of the rounds' own ratios, not a ratio of medians taken at different times."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_serve  # noqa: E402


def _row(c, decode, e2e, mb, spread=5.0):
    return {"concurrency": c, "tokens": 32 * c, "tok_s": e2e, "decode_tok_s": decode,
            "tpot_ms": 1e3 / decode * c, "sent_spread_ms": spread, "first_spread_ms": spread,
            "expert_mb_per_token": mb}


def test_ratios_are_the_median_of_each_rounds_own_ratio():
    # The VM drifts: round 2 runs at half speed. The rounds' own ratios are 4, 5 and 4.5, so
    # the level's ratio is 4.5; the ratio of the medians (40 over 10) mixes the rounds: 4.
    rounds = [[_row(1, 10.0, 9.0, 600.0), _row(16, 40.0, 30.0, 60.0)],
              [_row(1, 5.0, 4.0, 600.0), _row(16, 25.0, 16.0, 60.0)],
              [_row(1, 12.0, 10.0, 500.0), _row(16, 54.0, 45.0, 100.0)]]
    one, top = bench_serve.summarize(rounds)
    assert one["x_decode_tok_s"] == 1.0 and one["x_decode_range"] == (1.0, 1.0)
    assert top["x_decode_tok_s"] == pytest.approx(4.5)        # ratios 4, 5, 4.5
    assert top["x_decode_range"] == (4.0, 5.0)
    assert top["x_tok_s"] == pytest.approx(4.0)               # 30/9, 16/4, 45/10
    assert top["x_expert_mb_per_token"] == pytest.approx(0.1)  # 0.1, 0.1, 0.2
    assert top["decode_tok_s"] == 40.0 and one["decode_tok_s"] == 10.0  # medians per level
    assert top["concurrency"] == 16


def test_one_round_is_the_sweep_itself():
    (one, top), = [bench_serve.summarize([[_row(1, 8.0, 7.0, 500.0),
                                           _row(16, 36.0, 30.0, 50.0, spread=9.0)]])]
    assert top["x_decode_tok_s"] == 4.5 and top["x_decode_range"] == (4.5, 4.5)
    assert top["sent_spread_ms"] == 9.0 and one["expert_mb_per_token"] == 500.0


def test_bad_options_are_refused_before_any_request(capsys):
    # port 9 (discard): nothing answers there, so a request would fail with --url named
    assert bench_serve.main(["--url", "http://127.0.0.1:9", "--rounds", "0"]) == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    assert bench_serve.main(["--url", "http://127.0.0.1:9", "--max-tokens", "1"]) == 2
    assert "--max-tokens must be >= 2" in capsys.readouterr().err
