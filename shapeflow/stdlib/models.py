"""Model stages: the policy a spec trains."""

from __future__ import annotations

from pydantic import Field

from shapeflow.stdlib.registry import StageParams, stage


class StageUnavailable(RuntimeError):
    """A declared stage whose implementation arrives with a later part of shapeflow."""


class CausalLMParams(StageParams):
    path: str = Field(
        description="A local Hugging Face checkpoint folder, or 'builtin:NAME' for a small model "
        "built in code (e.g. 'builtin:arith-tiny')."
    )
    dtype: str = Field("auto", description="Weights dtype: 'auto', 'float32', 'bfloat16' or 'float16'.")


@stage("models.causal_lm", kind="model", inputs={}, output="Model", params=CausalLMParams, phase="setup")
def causal_lm(*, path, dtype):
    """A causal language model and its tokenizer, loaded from a local folder or built in code.

    Nothing is downloaded: ``path`` is a local Hugging Face checkpoint, or ``builtin:NAME``
    for a small model built from a transformers config with a character-level tokenizer.
    """
    raise StageUnavailable("models.causal_lm is declared; loading models arrives with the runtime (`shapeflow run`)")
