"""Fully sharded data parallel (FSDP) training: what the trainer needs beyond DDP.

Under FSDP each process holds a shard of every parameter, so nothing but the wrapped model's
own forward and backward (which gather the shards as they go, on every process together) may
read the weights. The trainer therefore keeps, on every process, a *full copy* of the policy
for everything that runs outside the update's forward/backward — sampling (any engine), the
behaviour log-probs, the greedy baseline and evaluation — refreshed from the shards after
every optimizer step (:func:`full_state_dict`, one all-gather of the weights). The copy costs
one model's parameters per process (no gradients, no optimizer state); the reference model,
when a stage asks for one, is a second full copy, as under DDP.

Where the launcher asks for FSDP:

- on GPUs, ``accelerate launch --use_fsdp`` makes ``Accelerator.prepare`` shard the model
  (FSDP1 or FSDP2, as the launch says);
- on the CPU, accelerate 1.15 ignores ``--use_fsdp`` (its CPU processes always run DDP), so the
  trainer shards the model itself with torch's FSDP2 (``fully_shard``: each decoder layer, then
  the rest), which runs on gloo; the optimizer and scheduler still go through ``prepare``.

Checkpoints hold full (unsharded) state in the same format as a one-process run's: the model's
``state_dict`` and the optimizer's (parameters numbered in the optimizer's order), gathered on
the first process, which writes them. A checkpoint resumes under FSDP, DDP or one process alike.

Tested on the CPU only (two gloo processes, FSDP2); the GPU path (accelerate's own sharding)
was not run here.
"""

from __future__ import annotations

import os
from typing import Any

from shapeflow._lazy import torch


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp`` sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_mode(accelerator) -> str | None:
    """``"accelerate"`` when accelerate shards the model, ``"cpu"`` when the launch asked for
    FSDP but accelerate runs plain CPU processes (the trainer shards), else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "accelerate"
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        return "cpu"
    return None


@torch.no_grad()
def sync_from_first(model, device) -> None:
    """The first process's weights and buffers on every process. Under ``accelerate launch
    --use_fsdp`` (which sets ``FSDP_CPU_RAM_EFFICIENT_LOADING``) transformers may load the
    weights on the first process only and leave the others with empty or meta tensors, for the
    sharding to overwrite; the full copies taken before sharding (the sampling copy, the
    reference) need the real weights on every process."""
    import torch.distributed as dist

    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
    for _, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
        dist.broadcast(tensor.data, src=0)


def shard_on_cpu(model) -> None:
    """FSDP2 in place: each of the model's repeated blocks (transformers' ``_no_split_modules``,
    the decoder layers) is a unit of its own, and the root holds the rest (embeddings, the
    final norm, the head; tied weights stay together in the root)."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model, reshard_after_forward=False)  # the root's leftovers are needed again in backward


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model) -> dict[str, Any]:
    """The sharded model's full weights on every process (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_copy(model) -> Any:
    """A plain module with ``model``'s architecture for the full weights (taken before sharding)."""
    import copy

    return copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def refresh(copy_, model) -> None:
    """Load the sharded ``model``'s current weights into ``copy_`` (collective)."""
    state = full_state_dict(model)
    params = dict(copy_.named_parameters(remove_duplicate=False))
    buffers = dict(copy_.named_buffers())
    for name, value in state.items():
        target = params.get(name, buffers.get(name))
        if target is None:
            raise KeyError(f"the full copy of the model has no '{name}'")
        target.copy_(value)


def checkpoint_state(model, optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) full state dicts on the first process (empty on the others), in the
    one-process format; every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    return weights, (_numbered(optim) if optim else {})


def load_checkpoint_state(model, optimizer, weights: dict[str, Any], optim: dict[str, Any]) -> None:
    """Shard full state dicts (every process holds them) into the model and the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options())
    set_optimizer_state_dict(model, optimizer, _named(optim, model, optimizer), options=_options())


def _numbered(optim: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's format) →
    torch's own format: parameters numbered in the order of the optimizer's groups."""
    index: dict[str, int] = {}
    groups = []
    for group in optim["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: s for name, s in optim["state"].items()}, "param_groups": groups}


def _named(optim: dict[str, Any], model, optimizer) -> dict[str, Any]:
    """The inverse of :func:`_numbered` for this model and optimizer."""
    names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters()}  # FSDP1's wrappers
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]
    return {"state": {order[int(i)]: s for i, s in optim["state"].items()}, "param_groups": groups}


def as_float(norm) -> float:
    """A gradient norm as a number (a DTensor's, gathered, under FSDP2)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
