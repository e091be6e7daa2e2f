"""Fit a 16-level int4 table (Lloyd-Max) to groups of synthetic weights.

How quant.int4_levels.STUDENT_T_LEVELS was made: groups of GROUP values drawn
from a distribution, each divided by minus its signed extreme (so the extreme
sits at -1, where the quantizer's anchor puts it), the extremes themselves
left out, then one-dimensional k-means with 16 centres and the first pinned
at -1; printed as integers (times 127, rounded).

    python tools/int4_levels_fit.py --dist t6      # -> STUDENT_T_LEVELS
    python tools/int4_levels_fit.py --dist gauss
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def lloyd(x: np.ndarray, k: int = 16, iters: int = 60) -> np.ndarray:
    """k sorted centres minimizing the squared error of x, the first pinned at -1."""
    c = np.quantile(x, (np.arange(k) + 0.5) / k)
    c[0] = -1.0
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)       # nearest centre
        for j in range(1, k):
            members = x[idx == j]
            if members.size:
                c[j] = members.mean()
        c[0] = -1.0
        c.sort()
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dist", default="t6", help="gauss or tDOF, e.g. t6 (default)")
    ap.add_argument("--groups", type=int, default=200_000)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    shape = (args.groups, args.group)
    if args.dist == "gauss":
        g = rng.standard_normal(shape)
    elif args.dist.startswith("t") and args.dist[1:].replace(".", "", 1).isdigit():
        g = rng.standard_t(float(args.dist[1:]), shape)
    else:
        print(f"error: --dist: expected gauss or tDOF (e.g. t6), found {args.dist!r}", file=sys.stderr)
        return 2
    ext = np.take_along_axis(g, np.abs(g).argmax(1)[:, None], 1)   # (G, 1) signed extreme
    x = (g / -ext).ravel()
    x = x[np.abs(x) < 1.0 - 1e-9]                                  # the extremes sit on -1
    print([int(v) for v in np.round(lloyd(x) * 127)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
