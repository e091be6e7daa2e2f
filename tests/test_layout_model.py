"""tools/layout_model.c: the tiled copy gives the row-major kernels' outputs bit for bit,
every variant reports a rate, and bad arguments get one line and exit 2.

The model needs a C compiler and AVX-512 VNNI; elsewhere these tests skip.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "tools" / "layout_model.c"
VARIANTS = ("read", "rows-fp32", "tiles-fp32", "rows-vnni", "tiles-vnni")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.fixture(scope="module")
def model_binary(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc")
    if not {"avx512f", "avx512bw", "avx512_vnni"} <= _cpu_flags():
        pytest.skip("the model needs AVX-512 F/BW/VNNI")
    out = tmp_path_factory.mktemp("layout_model") / "layout_model"
    subprocess.run(["gcc", "-O2", "-march=native", "-pthread", "-Wall",
                    str(SOURCE), "-o", str(out)], check=True)
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_tiles_match_rows_and_every_variant_reports(model_binary, threads):
    """K spans several 16-row tiles per thread, N several 64-column strips."""
    run = subprocess.run([str(model_binary), "128", "1024", "3", str(threads)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tiles give the rows' outputs bit for bit: yes" in run.stdout
    rates = {m[1]: (float(m[2]), float(m[3])) for m in
             re.finditer(r"^(\S+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", run.stdout, re.M)}
    assert tuple(rates) == VARIANTS
    assert all(gbps > 0 for gbps, _ in rates.values())
    assert rates["read"][1] == 1.0


@pytest.mark.parametrize("args", [["100", "1024"], ["128", "1000"], ["128", "1024", "0"],
                                  ["128", "1024", "3", "0"], ["128", "1024", "3", "3"]])
def test_bad_arguments_exit_2_with_one_line(model_binary, args):
    """K not a multiple of 16 x threads, N not of 64, no repeats, no or odd threads."""
    run = subprocess.run([str(model_binary), *args], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("layout_model: expected")
