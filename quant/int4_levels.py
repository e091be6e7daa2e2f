"""Non-uniform int4: the default level table and the search that quantizes to it.

Why a table: the uniform int4 grid spends as many levels on the sparse tails
of a group as on its dense middle. A group of 32 weights normalized by its
signed extreme (the extreme lands on -127) is distributed, for Gaussian or
Student-t weights, with most of its mass near zero; the 16 levels that
minimize the squared error of such values (Lloyd-Max: k-means in one dimension
with one level pinned at the extreme) are closer together near zero and
further apart in the tails. Measured on the 12-layer heavy-tailed synthetic
model (docs/FIDELITY.md): weight error 0.132 -> 0.105 and KL to int8 0.67x of
the uniform grid's, at the same 4.5 bits per weight (groups of 32, one bf16
scale each).

STUDENT_T_LEVELS: Lloyd-Max levels of groups of 32 Student-t values with 6
degrees of freedom (between the Gaussian and the heavy tails measured), each
group divided by minus its signed extreme, times 127, rounded; 200,000 groups,
60 iterations (derivation: ``tools/int4_levels_fit.py``). Sorted, so nibble n
is the n-th smallest level.
"""
from __future__ import annotations

STUDENT_T_LEVELS = (-127, -97, -75, -57, -42, -29, -17, -6, 4, 14, 25, 37, 51, 67, 86, 111)
