"""Policies: a causal LM and its tokenizer, from a local folder or built in code (`builtin:`).

Builtin models are made by a builder registered with :func:`builtin`; a builder writes an
ordinary Hugging Face folder (weights, config, tokenizer) into the cache, once, and every
later run loads that folder. Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shapeflow._cache import cache_root

BuiltinBuilder = Callable[[Path], None]  # writes a Hugging Face folder into the given path


@dataclass(frozen=True)
class Builtin:
    name: str
    build: BuiltinBuilder
    version: str  # bump to invalidate cached copies when the recipe changes
    doc: str


BUILTINS: dict[str, Builtin] = {}


def builtin(name: str, *, version: str, doc: str) -> Callable[[BuiltinBuilder], BuiltinBuilder]:
    """Register a builtin model recipe under ``builtin:NAME``."""

    def register(fn: BuiltinBuilder) -> BuiltinBuilder:
        if name in BUILTINS:
            raise ValueError(f"builtin model '{name}' is registered twice")
        BUILTINS[name] = Builtin(name, fn, version, doc)
        return fn

    return register


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # two runs building the same builtin wait for each other
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def builtin_folder(name: str) -> Path:
    """The cached folder of ``builtin:NAME``, building it on first use."""
    _load_builtin_modules()
    if name not in BUILTINS:
        known = ", ".join(sorted(BUILTINS)) or "none"
        raise ModelError(f"unknown builtin model 'builtin:{name}' (builtins: {known})")
    recipe = BUILTINS[name]
    key = hashlib.sha256(f"{name}:{recipe.version}".encode()).hexdigest()[:12]
    folder = cache_root() / "models" / f"{name}-{key}"
    with _locked(cache_root() / "models" / f".{name}.lock"):
        if not (folder / "shapeflow-builtin.json").is_file():
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                recipe.build(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            (staging / "shapeflow-builtin.json").write_text(json.dumps({"name": name, "version": recipe.version}))
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)  # atomic: a crash mid-build leaves no half-made cache entry
    return folder


def _load_builtin_modules() -> None:
    import importlib

    for module in ("shapeflow.runtime.builtin_tiny", "shapeflow.runtime.builtin_smollm2"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


class ModelError(RuntimeError):
    """A model that cannot be loaded; the message says what to do."""


@dataclass
class Policy:
    """The value of type ``Model``: a causal LM, its tokenizer and where it came from."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    source: str  # the path or builtin name from the spec
    frozen: bool = False  # a fixed copy (models.reference): sampled from, never trained

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


@dataclass
class Critic:
    """The value of a critic stage: a value head V(s) = w·h + b on the last hidden state, reading
    the policy's own trunk (``model`` None: one forward serves both) or a model of its own."""

    head: Any  # torch.nn.Linear(hidden_size, 1), registered as a submodule of the model it reads
    model: Any | None  # a separate transformers model, or None for the policy's trunk
    lr: float | None  # its learning rate (None: train.lr)
    source: str

    @property
    def shared(self) -> bool:
        return self.model is None


def new_value_head(model, seed: int = 0):
    """A Linear(hidden, 1) initialised as transformers initialises a token-classification head
    (normal with the config's initializer_range, zero bias), attached to ``model`` as
    ``value_head`` so that it moves, trains and is saved with it."""
    import torch

    config = model.config
    head = torch.nn.Linear(config.hidden_size, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, float(getattr(config, "initializer_range", 0.02)), generator=generator)
        head.bias.zero_()
    head.to(next(model.parameters()).device)
    model.add_module("value_head", head)
    return head


def load_policy(path: str, dtype: str = "auto") -> Policy:
    """Load ``path`` (a local folder, or ``builtin:NAME``) as a Policy, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with the run's progress
    folder = builtin_folder(path.removeprefix("builtin:")) if path.startswith("builtin:") else Path(path)
    if not folder.is_dir():
        raise ModelError(f"model path '{path}' is not a folder; give a local Hugging Face checkpoint "
                         "folder or 'builtin:NAME'")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder '{path}' has no config.json; is it a Hugging Face checkpoint?")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from '{path}': {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return Policy(model, tokenizer, path)
