"""Reward shaping from recent papers (issue 5): preference-as-reward and its baselines, novelty
sharpening, position bonuses, ranking rewards for failed responses.

Each stage is one small function over tensors, with its formula, paper and official-code
conventions in the docstring (see ../methods catalogs a and b)."""

from __future__ import annotations
