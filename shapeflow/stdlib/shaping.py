"""Advantage shaping from recent papers (issue 5): regrouping, rank maps, reweighting, baselines.

Each stage is one small function over tensors, with its formula, paper and official-code
conventions in the docstring (see ../methods catalogs a and b)."""

from __future__ import annotations
