"""What a stage can ask of a rollout, and where each need lives in a recorded-rollout file.

A stage declares ``needs=("entropy", ...)``; the compiler unions the needs of the graph so
the rollout engine computes exactly what is used (hidden states only when a stage asks for
them). Engines declare which needs they provide; the trainer provides the update-phase ones
(current-policy and reference log-probs) with a forward pass of its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    name: str
    level: str  # "seq" (one per response), "tok" (one per token) or "vec" (a vector per token)
    field: str  # where `--record` writes it and `replay` reads it; "extra.X" lives under `extra`
    doc: str
    provider: str = "engine"  # "engine" (the rollout engine) or "trainer" (a forward pass of its own)


NEEDS: dict[str, Need] = {
    n.name: n
    for n in (
        Need("prompt", "seq", "prompt", "the prompt text"),
        Need("answer", "seq", "answer", "the reference answer of the prompt"),
        Need("response", "seq", "response", "the decoded response text"),
        Need("response_ids", "tok", "response_ids", "the response token ids"),
        Need("logprobs", "tok", "logprobs", "behaviour log-probs of the sampled tokens (old policy)"),
        Need("truncated", "seq", "truncated", "the response stopped at the length limit without end-of-sequence"),
        Need("scores", "seq", "scores", "scalar scores recorded with each response (a task's own scorer, or a recorded file)"),
        Need("entropy", "tok", "entropy", "behaviour-policy token entropy over the full vocabulary"),
        Need("hidden_states", "vec", "extra.hidden_states", "last-layer hidden states of the response tokens"),
        Need("ref_logprobs", "tok", "ref_logprobs", "reference-model log-probs of the sampled tokens", "trainer"),
        Need("greedy_baseline", "seq", "extra.greedy_baseline",
             "the reward of a greedy response to the same prompt, scored by the stage's own `rewards` input "
             "(ReMax); one extra greedy rollout per prompt", "trainer"),
        Need("policy_logprobs", "tok", "extra.policy_logprobs", "current-policy log-probs (update phase)", "trainer"),
        Need("policy_entropy", "tok", "extra.policy_entropy", "current-policy token entropy (update phase, with gradient)", "trainer"),
    )
}

TRAINER_PROVIDES = frozenset(n.name for n in NEEDS.values() if n.provider == "trainer")
