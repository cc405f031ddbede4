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
