"""tools/device_check.py runs unchanged on CPU with --dry-run (the GPU run is the same code)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import device_check  # noqa: E402


def test_dry_run_reports_every_row(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert device_check.main(["--dry-run", "--workdir", str(tmp_path), "--tokens", "3",
                              "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["dry_run"] and [r["bits"] for r in report["rows"]] == [8, 4]
    for row in report["rows"]:
        assert row["syncs_per_token"] == 2 + 1          # tiny: 2 layers, plus sampling
        assert row["staging_gbps"] > 0 and row["expert_call_ms"] > 0
        assert row["decode_zero_hits_tok_s"] > 0 and row["decode_resident_tok_s"] > 0
        assert len(row["extrapolation"]) == 2
        assert [s["workers"] for s in row["staging"]] == [2, 4, 8]
        assert all(s["bytes_exact"] and s["registration"] == "pageable" and s["gbps"] > 0
                   for s in row["staging"])
        assert row["dispatches_per_token"] == 3 + 4 * 2  # tiny: 2 layers (test_device_path)
        assert row["xla_executions_per_token"] == row["dispatches_per_token"]
    assert "64-layer Grok-1 extrapolation" in text and "dry run on the CPU" in text
    assert "staging ring (engine effective vs raw pageable" in text and "WRONG" not in text


def test_bad_staging_options_exit_2(tmp_path, capsys):
    assert device_check.main(["--dry-run", "--workdir", str(tmp_path),
                              "--staging-workers", "0"]) == 2
    assert "--staging-workers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_refuses_to_measure_a_cpu_as_a_gpu(capsys):
    assert device_check.main([]) == 2
    assert "use --dry-run" in capsys.readouterr().err
