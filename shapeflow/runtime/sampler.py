"""Which prompts each step trains on: epochs over a seeded permutation of the dataset.

The state is two integers (epoch, position), so a checkpoint restores it exactly and a
resumed run draws the same prompts an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PromptSampler:
    size: int
    seed: int
    epoch: int = 0
    position: int = 0

    def _order(self, epoch: int) -> list[int]:
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != epoch:
            import torch

            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.size, generator=gen).tolist())
        return self._cache[1]

    def next(self, k: int) -> list[int]:
        """The next ``k`` dataset indices, moving to a new permutation at the end of an epoch."""
        if self.size == 0:
            raise ValueError("the dataset is empty")
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            take = order[self.position : self.position + (k - len(out))]
            out.extend(take)
            self.position += len(take)
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint sampler covers {state['size']} prompts, the dataset now has {self.size}")
        self.epoch, self.position = state["epoch"], state["position"]
