"""Print pip constraints pinning every dependency of setup.cfg to its declared floor.

CI installs the project with these constraints into a second venv and runs a
smoke subset, so a floor in setup.cfg is a tested version, not a guess.
"""
import configparser
import re
import sys
from pathlib import Path

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
for line in cfg["options"]["install_requires"].split("\n"):
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", line)
    if line.strip() and not m:
        sys.exit(f"setup.cfg: expected 'name>=version', found {line.strip()!r}")
    if m:
        print(f"{m.group(1)}=={m.group(2)}")
