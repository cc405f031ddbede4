"""The `train {}` and `track {}` blocks of a spec, validated like stage parameters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


class TrainConfig(_Block):
    """How the training loop runs. Every key has a default; a spec sets what it changes."""

    steps: int = Field(200, ge=1, description="Optimizer steps (each one rollout phase).")
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per step; each gives a group.")
    lr: float = Field(1e-4, gt=0, le=1, description="Peak learning rate of AdamW.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up, in steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    betas: list[float] = Field([0.9, 0.999], min_length=2, max_length=2, description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; none disables it.")
    ppo_epochs: int = Field(1, ge=1, le=100, description="Passes over each step's rollouts.")
    minibatches: int = Field(1, ge=1, description="Optimizer updates per epoch (the batch is split this many ways).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated into one minibatch update.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the device supports it, else full precision."
    )
    seed: int = Field(0, ge=0, description="Seed of sampling, data order and initialisation.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every K steps.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every K steps (0: only at the end).")
    eval_size: int = Field(256, ge=1, description="Held-out problems per evaluation.")


class TrackConfig(_Block):
    """Where metrics and artifacts go."""

    backend: Literal["mlflow", "jsonl", "none"] = Field("mlflow", description="Tracker.")
    experiment: str = Field("shapeflow", min_length=1, description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name; none derives one from the spec and time.")
    uri: str | None = Field(None, description="Tracking URI; none uses an embedded local store (mlflow.db) "
                            "in the folder that holds the run folder, shared by the runs there.")
    log_every: int = Field(1, ge=1, description="Log metrics every K steps.")


CONFIG_BLOCKS: dict[str, type[_Block]] = {"train": TrainConfig, "track": TrackConfig}
