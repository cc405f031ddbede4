"""Rollout stages: sample responses from the policy. Engines are registered here too."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.registry import REGISTRY, StageParams, stage

REGISTRY.add_engine(
    "generate",
    provides=("prompt", "answer", "response", "response_ids", "logprobs", "truncated", "scores",
              "entropy", "hidden_states"),
    doc="Hugging Face `generate` on the training model (CPU or GPU).",
)
REGISTRY.add_engine(
    "vllm",
    provides=("prompt", "answer", "response", "response_ids", "logprobs", "truncated", "scores"),
    doc="vLLM: sampled-token log-probs only; full-vocabulary quantities need a trainer-side pass.",
)


class SampleParams(StageParams):
    n: int = Field(8, ge=1, le=4096, description="Responses sampled per prompt (the group size).")
    max_new_tokens: int = Field(32, ge=1, le=1_000_000, description="Length limit of a response, in tokens.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature; log-probs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 disables it).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 disables it).")
    engine: Literal["generate", "vllm"] = Field("generate", description="The rollout engine.")
    chat: bool = Field(False, description="Format each prompt as one user turn with the tokenizer's chat "
                       "template (for instruct models); false feeds the prompt text as it is.")


@stage(
    "rollouts.sample",
    kind="rollout",
    inputs={"policy": "Model", "prompts": "Dataset"},
    output="Rollouts",
    params=SampleParams,
    phase="rollout",
    engine_param="engine",
    context=True,
)
def sample(policy, prompts, *, n, max_new_tokens, temperature, top_p, top_k, engine, chat, ctx):
    """Sample ``n`` responses for each prompt of the step; responses of one prompt form a group.

    Records the sampled tokens, their behaviour log-probs (at ``temperature``, exactly as the
    update phase computes them) and whatever else the graph needs.
    """
    examples = ctx.next_prompts(prompts)
    batch = ctx.engine(engine, policy).generate(
        examples, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, chat=chat
    )
    batch.task = prompts
    return ctx.complete(batch, policy, temperature=temperature)


@stage(
    "rollouts.drop_truncated",
    kind="rollout",
    inputs={"groups": "Rollouts"},
    output="Rollouts",
    needs=("truncated",),
    paper="Yu et al., DAPO, arXiv:2503.14476 (overlong filtering); TRL mask_truncated_completions (catalog B3)",
)
def drop_truncated(groups):
    """The same rollouts with every truncated response masked out of the loss.

        m'_{i,t} = m_{i,t} · 1[response i ended with end-of-sequence]

    A response that hit the length limit contributes nothing to a loss computed on the result
    (nor to token-mean denominators), as TRL's ``mask_truncated_completions``; rewards and
    advantages computed from the original ``groups`` are unchanged. Pass the result to the
    loss: ``losses.ppo_clip(adv, rollouts.drop_truncated(groups))``.
    """
    kept = groups.select(torch.arange(groups.size, device=groups.mask.device))
    kept.mask = groups.mask * (~groups.need("truncated")).to(groups.mask.dtype)[:, None]
    return kept


# --------------------------------------------------------------------------------------------
# rollouts.reference_answers: where a reference reward can come from on a task
# --------------------------------------------------------------------------------------------


@stage(
    "rollouts.reference_answers",
    kind="rollout",
    inputs={"groups": "Rollouts"},
    output="Rollouts",
    needs=("answer",),
    paper="Fu et al. 2025, PAR, arXiv:2502.18770 (a source of reference rewards)",
)
def reference_answers(groups):
    """A text-only view of the rollouts in which every response is its prompt's reference answer.

        y'_i = answer_i       (same prompts, groups and order)

    So that any verifier or reward that reads text scores the reference answer:
    ``verifiers.exact_answer(rollouts.reference_answers(groups))`` is the reward of the
    task's reference answer, a reference reward for ``par.preference``. Task scores are
    recomputed for the answer (``scores["task"]`` where the task has its own scorer); the view
    has no tokens (its mask has no columns, no log-probs or entropies), so token-level stages
    do not apply to it, and nothing is truncated. Example: answers ["65", "7"] give responses
    ["65", "7"], which exact_answer scores [1, 1].
    """
    from shapeflow.runtime.batch import RolloutBatch

    answers = [str(a) for a in groups.need("answer")]
    B = groups.size
    scores = {}
    task, examples = groups.task, groups.examples
    if getattr(task, "scorer", None) is not None and examples is not None:
        scores["task"] = torch.tensor([float(task.scorer(e, a)) for e, a in zip(examples, answers)],
                                      device=groups.device)
    return RolloutBatch(
        prompt_ids=list(groups.prompt_ids),
        group_index=groups.group_index,
        mask=groups.mask.new_zeros(B, 0),
        prompts=groups.prompts,
        answers=groups.answers,
        responses=answers,
        truncated=torch.zeros(B, dtype=torch.bool, device=groups.mask.device),
        scores=scores,
        examples=examples,
        task=task,
    )
