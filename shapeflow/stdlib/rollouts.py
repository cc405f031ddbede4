"""Rollout stages: sample responses from the policy. Engines are registered here too."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shapeflow._lazy import torch
from shapeflow.stdlib.registry import REGISTRY, StageParams, stage

REGISTRY.add_engine(
    "generate",
    provides=("prompt", "answer", "response", "response_ids", "logprobs", "truncated", "scores",
              "entropy", "hidden_states", "rollout_logprobs"),
    doc="Hugging Face `generate` on the training model (CPU or GPU).",
)
REGISTRY.add_engine(
    "vllm",
    provides=("prompt", "answer", "response", "response_ids", "logprobs", "truncated", "scores", "rollout_logprobs"),
    doc="vLLM: sampled-token log-probs only; full-vocabulary quantities need a trainer-side pass.",
)


# the sampling knobs that rollouts.sample and rollouts.resample share (one declaration each)
_MAX_NEW_TOKENS = Field(32, ge=1, le=1_000_000, description="Length limit of a response, in tokens.")
_TEMPERATURE = Field(1.0, gt=0, le=100, description="Sampling temperature; log-probs use the same one.")
_TOP_P = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 disables it).")
_TOP_K = Field(0, ge=0, description="Top-k sampling (0 disables it).")
_CHAT = Field(False, description="Format each prompt as one user turn with the tokenizer's chat template (for "
              "instruct models); false feeds the prompt text as it is.")


class SampleParams(StageParams):
    n: int = Field(8, ge=1, le=4096, description="Responses sampled per prompt (the group size).")
    max_new_tokens: int = _MAX_NEW_TOKENS
    temperature: float = _TEMPERATURE
    top_p: float = _TOP_P
    top_k: int = _TOP_K
    engine: Literal["generate", "vllm"] = Field("generate", description="The rollout engine.")
    chat: bool = _CHAT
    pad_to: Literal["longest", "max_new_tokens"] = Field(
        "longest", description="Width of the batch's response tensors: the longest response of the step, or "
        "max_new_tokens for every step as verl pads (max_response_length). Only statistics that read padding "
        "positions see a difference (UCAS's certainty summed over every position); the longer width costs "
        "compute in every pass.")


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
def sample(policy, prompts, *, n, max_new_tokens, temperature, top_p, top_k, engine, chat, pad_to, ctx):
    """Sample ``n`` responses for each prompt of the step; responses of one prompt form a group.

    Records the sampled tokens, their behaviour log-probs (at ``temperature``, exactly as the
    update phase computes them) and whatever else the graph needs.
    """
    examples = ctx.next_prompts(prompts)
    batch = ctx.engine(engine, policy).generate(
        examples, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, chat=chat,
        logprobs=ctx.wants("rollout_logprobs"), seeds=ctx.seeds,
    )
    if pad_to == "max_new_tokens":
        from shapeflow.runtime.batch import pad_responses

        batch = pad_responses(batch, max_new_tokens, policy.pad_token_id)
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


class ResampleParams(StageParams):
    max_new_tokens: int = _MAX_NEW_TOKENS
    temperature: float = _TEMPERATURE
    top_p: float = _TOP_P
    top_k: int = _TOP_K
    engine: Literal["generate"] = Field("generate", description="The engine that samples (the generate engine "
                                        "on the given model).")
    chat: bool = _CHAT


@stage(
    "rollouts.resample",
    kind="rollout",
    inputs={"model": "Model", "groups": "Rollouts"},
    output="Rollouts",
    params=ResampleParams,
    context=True,
    paper="Fu et al. 2025, PAR, arXiv:2502.18770 (reference responses sampled from the SFT policy)",
)
def resample(model, groups, *, max_new_tokens, temperature, top_p, top_k, engine, chat, ctx=None):
    """New responses to the same prompts, sampled from ``model``, laid out row for row like ``groups``.

        y'_i ~ model(· | x_i)        row i answers the prompt of row i; same groups, same order

    Each group gets as many responses as it has, so a verifier or reward on the result is a
    (B,) signal aligned with ``groups``: the reference rewards of PAR,
    ``par.preference(r, verifiers.exact_answer(rollouts.resample(ref, groups)), groups)`` with
    ``ref = models.reference(policy)``. Sampling is seeded per prompt and step; with several
    processes each samples its share of the groups. The result carries text, token ids, mask
    and task scores, not log-probs: it is for scoring, not for a loss. Needs the runtime.
    """
    if ctx is None:
        raise ValueError("rollouts.resample samples from a model: it runs in training, not in replay")
    return ctx.resample(model, groups, engine=engine, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, chat=chat)


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


class DynamicSamplingParams(StageParams):
    max_rounds: int = Field(10, ge=0, le=10_000, description="Generation rounds per step at most, the first "
                            "included (verl algorithm.filter_groups.max_num_gen_batches, 10 in the DAPO recipe); "
                            "0: no limit.")
    on_shortfall: Literal["train", "error"] = Field(
        "train", description="When the rounds run out before the budget is met: train on the groups kept (the "
        "shortfall is in the metrics), or stop the run as verl does ('Generated too many')."
    )


@stage(
    "rollouts.dynamic_sampling",
    kind="rollout",
    inputs={"groups": "Rollouts", "metric": "Signal[seq]"},
    output="Rollouts",
    params=DynamicSamplingParams,
    context=True,
    paper="Yu et al., DAPO, arXiv:2503.14476 (dynamic sampling); as verl's DAPO recipe filter_groups (catalog B3)",
)
def dynamic_sampling(groups, metric, *, max_rounds, on_shortfall, ctx=None):
    """DAPO's dynamic sampling: drop the groups whose metric has no spread, generate more until
    the step's prompt budget (train.prompts_per_step groups) is met, then cut to the budget.

        keep group g  ⇔  |g| = 1  or  std(metric over g) > 0      (np.std > 0: values not all equal)

    Each extra round draws the next prompts and reruns the nodes between the rollout and
    ``metric`` on them (``ctx.regenerate``); the kept groups of all rounds, in order, are cut
    to the budget, as verl keeps the first ``train_batch_size`` prompts. Everything after this
    stage (rewards, advantages, losses) must read its output, so that a dropped group never
    reaches the loss:

        rollout groups = rollouts.dynamic_sampling(sampled, verifiers.exact_answer(sampled))

    Metrics: ``rollout/<binding>/rounds`` (generation rounds this step), ``kept_groups``,
    ``dropped_groups`` (over all rounds) and ``shortfall_groups`` (budget − kept, when the
    rounds ran out). When no group at all survives, the last round is trained on unfiltered
    (its advantages are 0 where groups are flat). Without the runtime (``replay``) it only
    filters. Example: metric [1, 1, 0, 1 | 0, 0, 0, 0 | 1] with groups of 4, 4 and 1 keeps the
    first group and the single response, and drops the second.
    """
    budget = ctx.trainer.config.prompts_per_step if ctx is not None else None
    kept, last = [], groups
    n_kept = dropped = 0
    rounds = 1
    while True:
        keep = _spread(metric, groups)
        n_groups = int(torch.unique(groups.group_index).numel()) if groups.size else 0
        part = groups.select(torch.nonzero(keep[groups.group_index], as_tuple=True)[0]) if groups.size else groups
        groups_kept = int(keep.sum())
        kept.append(part)
        n_kept += groups_kept
        dropped += n_groups - groups_kept
        last = groups
        if budget is None or n_kept >= budget or (max_rounds and rounds >= max_rounds):
            break
        groups, metric = ctx.regenerate()
        rounds += 1
    if ctx is not None:
        ctx.log("rounds", rounds)
        ctx.log("kept_groups", n_kept)
        ctx.log("dropped_groups", dropped)
        ctx.log("shortfall_groups", max(0, budget - n_kept))
        if n_kept < budget and on_shortfall == "error":
            raise RuntimeError(f"dynamic sampling kept {n_kept} of {budget} groups in {rounds} rounds "
                               "(max_rounds); the prompts may be too hard or too easy for the policy")
    if n_kept == 0:
        return last
    from shapeflow.runtime.batch import concat_batches

    out = concat_batches([p for p in kept if p.size])
    if budget is not None and n_kept > budget:  # the first `budget` groups (compact ids: 0..G−1 in order)
        out = out.select(torch.nonzero(out.group_index < budget, as_tuple=True)[0])
    return out


def _spread(metric, groups):
    """(G,) true for the groups to keep: one response, or values that are not all equal."""
    from shapeflow.stdlib.functional import group_all_equal

    index = groups.group_index
    num = int(index.max()) + 1 if index.numel() else 0
    present = torch.bincount(index, minlength=num) > 0
    return present & ~group_all_equal(metric.to(torch.float32), index, num)
