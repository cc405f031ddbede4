"""Model stages: the policy a spec trains."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shapeflow.stdlib.registry import StageParams, stage


class CausalLMParams(StageParams):
    path: str = Field(
        description="A local Hugging Face checkpoint folder, or 'builtin:NAME' for a small model "
        "built in code (e.g. 'builtin:arith-tiny')."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype as loaded (training may still use mixed precision)."
    )


@stage("models.causal_lm", kind="model", inputs={}, output="Model", params=CausalLMParams, phase="setup")
def causal_lm(*, path, dtype):
    """A causal language model and its tokenizer, loaded from a local folder or built in code.

    Nothing is downloaded: ``path`` is a local Hugging Face checkpoint, or ``builtin:NAME``
    for a small model built from a transformers config with a character-level tokenizer.
    """
    from shapeflow.runtime.models import load_policy

    return load_policy(path, dtype)


@stage("models.reference", kind="model", inputs={"policy": "Model"}, output="Model", phase="setup",
       paper="the reference (SFT) policy of RLHF; PAR (Fu et al. 2025, arXiv:2502.18770) samples its reference "
             "responses from it")
def reference(policy):
    """A frozen copy of ``policy`` as it is before training: π_ref = π_θ₀.

    It is never trained and never receives the policy's updates (its weights are the
    initial ones, also on ``--resume``: setup builds it from the freshly loaded model before a
    checkpoint restores the policy). Sample from it with ``rollouts.resample(ref, groups)``,
    e.g. for PAR's reference responses. Costs one more copy of the weights.
    """
    import copy

    from shapeflow.runtime.models import Policy

    if not isinstance(policy, Policy) or policy.frozen:
        raise ValueError("models.reference takes the policy the run trains (a models.causal_lm)")
    frozen = copy.deepcopy(policy.model).eval().requires_grad_(False)
    return Policy(frozen, policy.tokenizer, f"reference of {policy.source}", frozen=True)
