"""The training loop: execute a compiled plan, step after step.

    setup    once: models, datasets, optimizer (through accelerate)
    rollout  each step: sampler → engine → behaviour log-probs and the graph's needs →
             the rollout-phase nodes (verify, reward, advantage, ...) in plan order
    update   PPO epochs × minibatches × micro-batches: current-policy forward → the
             update-phase nodes → the objective → backward, clip, optimizer step
    metrics  every node's output summarised (mean, std, min, max, fraction zero)

Nothing here branches on a stage's name: stages run through the executor; what a stage
needs from the rollout arrives through the needs the compiler collected.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import contextmanager
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shapeflow._lazy import torch
from shapeflow.compiler.check import Program
from shapeflow.compiler.plan import Plan
from shapeflow.config import TrainConfig
from shapeflow.runtime import sharding
from shapeflow.runtime.batch import RolloutBatch
from shapeflow.runtime.engine import ENGINES, token_logprobs, token_needs, token_values
from shapeflow.runtime.models import Critic, Policy
from shapeflow.runtime.executor import downstream_of, new_states, run_nodes
from shapeflow.runtime.sampler import PromptSampler
from shapeflow.stdlib.functional import SCOPES, ScopeStatistics, aggregation_scope, scope_statistics
from shapeflow.stdlib.registry import Registry


class RunError(RuntimeError):
    """A problem that stops a run with a clear message (no traceback for the user)."""


def _seed_for(*parts: int) -> int:
    """A stable 63-bit seed from integers (per step, per epoch), independent of history."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class StepContext:
    """What context-taking stages (the rollout) get from the runtime for one step."""

    trainer: "Trainer"
    step: int
    micro_rows: list["torch.Tensor"] = field(default_factory=list)  # epoch-0 micro-batches, in update order
    node_id: str | None = None  # the node being run (set by the executor)
    metrics: dict[str, float] = field(default_factory=dict)  # what stages report for this step
    draws: int = 0  # prompt draws so far this step (dynamic sampling draws again)
    seeds: list[int] = field(default_factory=list)  # one sampling seed per prompt of the last draw

    def log(self, key: str, value: float) -> None:
        """Report a number for this step: it appears as ``rollout/<binding>/<key>``."""
        node = self.trainer.program.nodes[self.node_id]
        self.metrics[f"rollout/{node.binding or node.id}/{key}"] = float(value)

    def regenerate(self) -> list[Any]:
        """This node's inputs computed afresh on new prompts: the rollout stage draws the next
        prompts and the nodes between it and this node run again (DAPO's dynamic sampling asks
        for more groups this way). Stateful nodes among them see a copy of their state."""
        return self.trainer.regenerate(self)

    def next_prompts(self, dataset) -> list[Any]:
        """This process's share of the step's prompts (all of them with one process). Every
        process draws the same prompts; each prompt gets a sampling seed from the run's seed,
        the step, the draw and its position, so its responses do not depend on how the prompts
        are split between processes."""
        trainer = self.trainer
        sampler = trainer.sampler_for(dataset)
        total = trainer.config.prompts_per_step
        chosen = sampler.next(total)
        seeds = [_seed_for(trainer.seed, self.step, self.draws, i) for i in range(total)]
        self.draws += 1
        lo, hi = trainer.rank * total // trainer.world, (trainer.rank + 1) * total // trainer.world
        self.seeds = seeds[lo:hi]
        return [dataset[i] for i in chosen[lo:hi]]

    def engine(self, name: str, policy):
        return self.trainer.engine(name, policy)

    def wants(self, need: str) -> bool:
        """Whether some stage of the spec needs ``need`` (an engine computes extras only then)."""
        return need in self.trainer.program.needs

    def resample(self, model, groups: RolloutBatch, *, engine: str, **sampling: Any) -> RolloutBatch:
        """New responses from ``model`` to the prompts of ``groups``, row for row (see Trainer.resample)."""
        return self.trainer.resample(self, model, groups, engine=engine, **sampling)

    def complete(self, batch: RolloutBatch, policy, *, temperature: float) -> RolloutBatch:
        batch = self.trainer.complete(batch, policy, temperature=temperature,
                                      micro_rows=self.micro_rows if self.trainer.world == 1 else [])
        return self.trainer.gather(batch)


def summarize(value: Any, mask: "torch.Tensor | None") -> dict[str, float]:
    """mean, std, min, max and fraction zero of a (B,) or (B, T) value (valid tokens only)."""
    if not torch.is_tensor(value) or value.numel() == 0:
        return {}
    v = value.detach().float()
    if v.dim() == 2 and mask is not None and mask.shape == v.shape:
        v = v[mask > 0]
    elif v.dim() > 2:
        return {}
    v = v.flatten()
    if v.numel() == 0:
        return {}
    finite = torch.isfinite(v)
    out = {
        "mean": float(v[finite].mean()) if finite.any() else float("nan"),
        "std": float(v[finite].std(unbiased=False)) if finite.sum() > 1 else 0.0,
        "min": float(v[finite].min()) if finite.any() else float("nan"),
        "max": float(v[finite].max()) if finite.any() else float("nan"),
        "frac_zero": float((v == 0).float().mean()),
    }
    if not finite.all():
        out["frac_nonfinite"] = float((~finite).float().mean())
    return out


class Trainer:
    def __init__(self, program: Program, plan: Plan, registry: Registry, config: TrainConfig, *,
                 device: str = "auto", seed: int | None = None):
        self.program, self.plan, self.registry, self.config = program, plan, registry, config
        self.seed = config.seed if seed is None else seed
        self.device_name = device
        self.values: dict[str, Any] = {}
        self.samplers: dict[int, PromptSampler] = {}
        self.engines: dict[tuple[str, int], Any] = {}
        self.reference = None
        self.critic = self.critic_model = None
        self.step_index = 0
        self.nonfinite_scores = 0
        self.nonfinite: dict[str, int] = {}  # signal binding -> responses whose value was NaN/inf
        self.stage_states = new_states(program, registry, program.nodes)  # stateful nodes' trackers, EMAs...

    # --- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator

        torch.manual_seed(self.seed)
        use_cuda = self.device_name == "cuda" or (self.device_name == "auto" and torch.cuda.is_available())
        if self.device_name == "cuda" and not torch.cuda.is_available():
            raise RunError("--device cuda: no CUDA device is available")
        precision = self.config.mixed_precision
        if precision == "auto":
            precision = "bf16" if use_cuda and torch.cuda.is_bf16_supported() else "no"
        if not use_cuda and sharding.fsdp_requested() and os.environ.get("FSDP_VERSION", "1") != "2":
            raise RunError("FSDP on the CPU runs as FSDP2 (torch's fully_shard; accelerate's FSDP1 needs a GPU): "
                           "launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`")
        self.accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if self.config.prompts_per_step % self.world:
            raise RunError(f"train.prompts_per_step = {self.config.prompts_per_step} does not split evenly over "
                           f"{self.world} processes")
        run_nodes(self.program, self.plan.phases["setup"], self.values, self.registry)
        models = [n for n in self.plan.phases["setup"] if self.program.nodes[n].type.base == "Model"]
        policies = [n for n in models if isinstance(self.values[n], Policy) and not self.values[n].frozen]
        for n in models:  # frozen copies (models.reference) sample on the trainer's device
            if isinstance(self.values[n], Policy) and self.values[n].frozen:
                self.values[n].model.to(self.device)
        critics = [n for n in models if isinstance(self.values[n], Critic)]
        if len(policies) != 1:
            raise RunError(f"a run trains exactly one policy; this spec has {len(policies)}")
        if len(critics) > 1:
            raise RunError(f"a run trains at most one critic; this spec has {len(critics)}")
        self.policy_node = policies[0]
        self.policy = self.values[self.policy_node]
        self.critic = self.values[critics[0]] if critics else None
        self.policy.model.to(self.device)
        if self.critic is not None and not self.critic.shared:
            self.critic.model.to(self.device)
        self.fsdp = sharding.fsdp_mode(self.accelerator)
        if self.fsdp is not None:  # the first process's weights everywhere (see sync_from_first)
            sharding.sync_from_first(self.policy.model, self.device)
            for n in models:  # frozen copies (models.reference) were taken from the loaded weights too
                if isinstance(self.values[n], Policy) and self.values[n].frozen:
                    sharding.sync_from_first(self.values[n].model, self.device)
        if "ref_logprobs" in self.program.needs:  # a frozen copy, only when a stage asks for it
            self.reference = copy.deepcopy(self.policy.model).eval().requires_grad_(False)
        # FSDP: every process samples and scores with a full copy of the policy, refreshed from
        # the shards after every optimizer step (shapeflow.runtime.sharding)
        self.full_policy = self.policy
        if self.fsdp is not None:
            if self.critic is not None:
                raise RunError("critics (value heads) are not supported under FSDP yet; launch without --use_fsdp")
            self.full_policy = dataclasses.replace(self.policy, model=sharding.full_copy(self.policy.model))
            if self.fsdp == "cpu":
                sharding.shard_on_cpu(self.policy.model)  # in place: the optimizer takes the sharded parameters
        cfg = self.config
        groups = self._param_groups()
        fused = all(p.dtype == torch.float32 for g in groups for p in g["params"])  # one kernel: much faster on CPU
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        if self.fsdp == "cpu":  # accelerate would wrap the model in DDP: it gets only the optimizer and scheduler
            self.model = self.policy.model
            self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        elif self.critic is None or self.critic.shared:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.policy.model, optimizer,
                                                                                  scheduler)
            self.critic_model = self.model if self.critic is not None else None
        else:
            self.model, self.critic_model, self.optimizer, self.scheduler = self.accelerator.prepare(
                self.policy.model, self.critic.model, optimizer, scheduler)
        self.rollout_nodes = [n for n in self.plan.phases["rollout"] if n in self.program.engines]
        if len(self.rollout_nodes) != 1:
            raise RunError(f"a run needs exactly one rollout; this spec has {len(self.rollout_nodes)}")
        self.rollout_node = self.rollout_nodes[0]
        if self.world > 1:  # an engine that joins the process group as it starts (vLLM's): on every process at once
            self.engine(self.program.nodes[self.rollout_node].params.get("engine", "generate"), self.policy)
        # The training batch: the rollouts the update phase reads (the generated batch, or what a
        # rollout-phase stage made of it: a filtered or re-masked batch).
        consumed = sorted({src for n in self.plan.phases["update"] for _, src in self.program.nodes[n].inputs
                           if self.program.nodes[src].type.base == "Rollouts"},
                          key=lambda n: self.program.nodes[n].order)
        self.batch_node = consumed[-1] if consumed else self.rollout_node
        # On-policy with one optimizer step per rollout, the update's own first forward *is* the
        # behaviour pass (same weights, same micro-batches): reuse it instead of running it twice,
        # unless a rollout-phase stage needs token statistics before the update.
        rollout_needs = set().union(*(self.program.nodes[n].needs for n in self.plan.phases["rollout"]))
        self.token_extras = token_needs(self.program.needs)  # full-logit reductions, only when asked for
        self.behaviour_from_update = (
            self.config.ppo_epochs == 1 and self.config.minibatches == 1
            and not rollout_needs & {"logprobs", "entropy", "hidden_states"}
            and not {"entropy", "hidden_states"} & set(self.program.needs)
            and not self.token_extras
            and "values" not in self.program.needs
            and self.world == 1  # with several processes each computes its own rows: the pass runs before the gather
        )
        # the widest statistics scope of the update's losses (STEER's ω range): "micro" needs no extra pass
        scopes = [self.program.nodes[n].params[self.registry[self.program.nodes[n].stage].scope_param]
                  for n in self.plan.phases["update"] if self.program.nodes[n].op == "stage"
                  and self.registry[self.program.nodes[n].stage].scope_param is not None]
        self.stats_scope = max(scopes, key=SCOPES.index, default="micro")

    def _param_groups(self) -> list[dict[str, Any]]:
        """The policy's parameters, and the critic's (its head, and its own model if it has one)
        in a group of their own when the critic sets a learning rate."""
        critic = self.critic
        if critic is None:
            return [{"params": list(self.policy.model.parameters())}]
        head = {id(p) for p in critic.head.parameters()}
        policy = [p for p in self.policy.model.parameters() if id(p) not in head]
        critic_params = list(critic.model.parameters()) if not critic.shared else list(critic.head.parameters())
        lr = critic.lr if critic.lr is not None else self.config.lr
        return [{"params": policy}, {"params": critic_params, "lr": lr}]

    @property
    def trainable_parameters(self) -> list[Any]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _lr_factor(self, step: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def sampler_for(self, dataset) -> PromptSampler:
        key = id(dataset)
        if key not in self.samplers:
            self.samplers[key] = PromptSampler(len(dataset), self.seed)
        return self.samplers[key]

    def engine(self, name: str, policy):
        if name not in ENGINES:
            raise RunError(f"rollout engine '{name}' is not available in this installation "
                           f"(available: {', '.join(ENGINES)})")
        key = (name, id(policy))
        if key not in self.engines:  # under FSDP, engines sample from the full copy
            self.engines[key] = ENGINES[name](self.full_policy if policy is self.policy else policy, self.device)
        return self.engines[key]

    def gather(self, batch: RolloutBatch) -> RolloutBatch:
        """Every process's rollouts, in process order, as one batch on every process (one
        process: the batch itself). The rest of the rollout phase then runs on the whole
        batch everywhere, so groups, batch statistics and advantages are those of one process."""
        if self.world == 1:
            return batch
        import torch.distributed as dist

        from shapeflow.runtime.batch import concat_batches

        task, batch.task = batch.task, None  # the same on every process; not sent
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, batch.to("cpu"))
        batch.task = task
        out = concat_batches(parts).to(self.device)
        out.task = task
        return out

    @staticmethod
    def _aggregation_scope(batch: RolloutBatch, minibatch: list["torch.Tensor"]) -> tuple[float, float, float]:
        """(valid tokens, non-empty responses, responses) of a whole minibatch."""
        lengths = batch.mask[torch.cat(minibatch).to(batch.mask.device)].sum(-1)
        return float(lengths.sum()), float((lengths > 0).sum()), float(lengths.numel())

    def _sum_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        total = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(total)
        return dict(zip(keys, total.tolist()))

    def _my_rows(self, minibatch: list["torch.Tensor"]) -> list["torch.Tensor"]:
        """This process's micro-batches of a minibatch: its contiguous share of the minibatch's
        rows, split into grad_accum micro-batches (all of it with one process)."""
        if self.world == 1:
            return minibatch
        rows = torch.cat(minibatch)
        mine = rows.tensor_split(self.world)[self.rank]
        return [r for r in mine.tensor_split(self.config.grad_accum) if r.numel()]

    def _weights_changed(self) -> None:
        """After every optimizer step (and a resume): under FSDP the full copy of the policy is
        refreshed from the shards (on every process together); engines that keep a copy of the
        policy's weights (vLLM) get the new ones (an engine declares ``weights_updated(model)``;
        the generate engine samples from the training model, or its full copy, and has none).
        Engines of frozen models (models.reference) keep theirs."""
        if self.fsdp is not None:
            sharding.refresh(self.full_policy.model, self.model)
        for (_, owner), engine in self.engines.items():
            if owner != id(self.policy):
                continue
            hook = getattr(engine, "weights_updated", None)
            if hook is not None:
                hook(self._full_model())

    def _full_model(self):
        """The policy with all its weights, for passes outside the update's forward/backward:
        the training model itself (one process, DDP) or its full copy (FSDP)."""
        if self.fsdp is not None:
            return self.full_policy.model
        return self.accelerator.unwrap_model(self.model)

    # --- rollout phase -------------------------------------------------------------------
    def micro_batches(self, size: int, step: int, epoch: int) -> list[list["torch.Tensor"]]:
        """Minibatches (each a list of micro-batch row sets) for one epoch of one step."""
        gen = torch.Generator().manual_seed(_seed_for(self.seed, step, epoch))
        perm = torch.randperm(size, generator=gen)
        minis = [m for m in perm.tensor_split(self.config.minibatches) if m.numel()]
        return [[r for r in m.tensor_split(self.config.grad_accum) if r.numel()] for m in minis]

    @torch.no_grad()
    def complete(self, batch: RolloutBatch, policy, *, temperature: float,
                 micro_rows: list["torch.Tensor"], baseline: bool = True, training: bool = True) -> RolloutBatch:
        """Fill the needs of the graph on a fresh batch with trainer-side forward passes.

        Behaviour log-probs are computed on the same micro-batches, in the same shapes, as the
        first epoch of the update, so that the first ratio is exactly 1. ``training`` false: a
        batch that is not trained on (a greedy baseline, an initialisation pass), whose
        behaviour pass cannot come from the update's forward."""
        needs = self.program.needs
        B, T = batch.mask.shape
        batch.logprobs = torch.zeros(B, T, device=batch.mask.device)
        want_entropy, want_hidden = "entropy" in needs, "hidden_states" in needs
        if want_entropy:
            batch.entropy = torch.zeros(B, T, device=batch.mask.device)
        hidden_rows = {}
        model = self._full_model()
        want_values = "values" in needs
        shared_head = self.critic.head if want_values and self.critic.shared else None
        if want_values:
            batch.extra["values"] = torch.zeros(B, T, device=batch.mask.device)
        # (skipped when the update's first forward doubles as the behaviour pass)
        for rows in (micro_rows or [torch.arange(B)]) if not (training and self.behaviour_from_update) else []:
            rows = rows.to(batch.mask.device)
            stats = token_logprobs(model, batch.prompt_tokens[rows], batch.prompt_mask[rows],
                                   batch.response_ids[rows], batch.mask[rows], temperature=temperature,
                                   entropy=want_entropy, hidden=want_hidden, extras=self.token_extras,
                                   value_head=shared_head)
            batch.logprobs[rows] = stats.logprobs
            if want_values:
                batch.extra["values"][rows] = stats.values if shared_head is not None else self._critic_values(
                    batch, rows, grad=False)
            for name, value in stats.extra.items():
                batch.extra.setdefault(name, torch.zeros(B, T, device=batch.mask.device))[rows] = value
            if want_entropy:
                batch.entropy[rows] = stats.entropy
            if want_hidden:
                hidden_rows[rows] = stats.hidden
        if want_hidden:
            H = next(iter(hidden_rows.values())).shape[-1]
            hidden = torch.zeros(B, T, H, device=batch.mask.device)
            for rows, h in hidden_rows.items():
                hidden[rows] = h
            batch.extra["hidden_states"] = hidden
        if self.reference is not None:
            with self.accelerator.autocast():  # the reference is not `prepare`d: same precision as the policy
                batch.ref_logprobs = token_logprobs(self.reference, batch.prompt_tokens, batch.prompt_mask,
                                                    batch.response_ids, batch.mask,
                                                    temperature=temperature).logprobs
        if "greedy_baseline" in needs and baseline:
            batch.extra["greedy_baseline"] = self._greedy_baseline(batch, policy)
        self._task_scores(batch)
        return batch

    def _task_scores(self, batch: RolloutBatch) -> None:
        """``scores["task"]``: the task's own scorer on each response, where the task has one."""
        task = batch.task
        if getattr(task, "scorer", None) is not None:
            scores = torch.tensor([float(task.scorer(e, r)) for e, r in zip(batch.examples, batch.responses)],
                                  device=batch.device)
            bad = ~torch.isfinite(scores)
            if bad.any():  # a scorer's NaN must not poison the step: count it and score it 0
                self.nonfinite_scores += int(bad.sum())
                scores = torch.where(bad, torch.zeros_like(scores), scores)
            batch.scores["task"] = scores

    @torch.no_grad()
    def resample(self, ctx: StepContext, model, groups: RolloutBatch, *, engine: str, **sampling: Any) -> RolloutBatch:
        """As many new responses from ``model`` to each prompt of ``groups`` as the group has, in
        the rows of ``groups`` (row i answers row i's prompt): a signal computed on the result is
        aligned with ``groups``. Seeded per group from the run's seed, the step and the node;
        with several processes each samples a contiguous share of the groups, then all gather."""
        index = groups.group_index
        G = groups.num_groups
        sizes = torch.bincount(index, minlength=G)
        n = int(sizes.max()) if G else 0
        if G and bool((sizes != n).any()):
            raise RunError("rollouts.resample needs groups of one size (got sizes "
                           f"{sorted(set(sizes.tolist()))})")
        first = {}
        for i, g in enumerate(index.tolist()):
            first.setdefault(g, i)
        examples = [groups.examples[first[g]] for g in range(G)]
        node = self.program.nodes[ctx.node_id]
        seeds = [_seed_for(self.seed, ctx.step, 1 + node.order, 7, g) for g in range(G)]
        lo, hi = self.rank * G // self.world, (self.rank + 1) * G // self.world
        out = self.engine(engine, model).generate(examples[lo:hi], n=n, seeds=seeds[lo:hi], **sampling)
        out.task = groups.task
        self._task_scores(out)
        out = self.gather(out)
        # row i of groups is the j-th response of its group g: take row g·n + j of the samples
        rank_in_group = torch.zeros_like(index)
        seen = torch.zeros(G, dtype=torch.long)
        for i, g in enumerate(index.tolist()):
            rank_in_group[i] = seen[g]
            seen[g] += 1
        out = out.select((index * n + rank_in_group).to(out.mask.device))
        out.group_index, out.prompt_ids = groups.group_index, list(groups.prompt_ids)
        return out

    def _greedy_baseline(self, batch: RolloutBatch, policy) -> "torch.Tensor":
        """(B,) the reward of one greedy response per prompt, scored by the `rewards` input of the
        stage that needs it (ReMax's baseline), shared by the prompt's responses."""
        users = [n for n in self.plan.phases["rollout"] if "greedy_baseline" in self.program.nodes[n].needs]
        sources = {dict(self.program.nodes[n].inputs)["rewards"] for n in users}
        if len(sources) != 1:
            raise RunError("stages that need a greedy baseline must share one `rewards` input")
        (source,) = sources
        unique: dict[Any, Any] = {}
        for e in batch.examples:  # the step's prompts, each once
            unique.setdefault(e.id, e)
        order = {pid: i for i, pid in enumerate(unique)}
        params = self.program.nodes[self.rollout_node].params
        greedy = self.engine(params.get("engine", "generate"), policy).generate(
            list(unique.values()), n=1, max_new_tokens=params["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
            greedy=True, chat=bool(params.get("chat", False)))
        greedy.task = batch.task
        nodes, values = self._on_batch(greedy, source)
        if any("greedy_baseline" in self.program.nodes[n].needs for n in nodes):
            raise RunError("a greedy baseline cannot depend on itself")
        self.complete(greedy, policy, temperature=float(params.get("temperature", 1.0)), micro_rows=[],
                      baseline=False, training=False)
        run_nodes(self.program, nodes, values, self.registry, greedy.mask, check=self._finite_signals,
                  states=self._state_copies())
        scores = values[source].float()
        if scores.dim() == 2:  # a token-level reward: its total
            scores = (scores * greedy.mask).sum(-1)
        index = torch.tensor([order[e.id] for e in batch.examples], device=scores.device)
        return scores[index]

    def rollout_phase(self, step: int) -> tuple[dict[str, Any], RolloutBatch]:
        values = dict(self.values)  # setup values (model, datasets)
        rollout_params = self.program.nodes[self.rollout_node].params
        size = self.config.prompts_per_step * int(rollout_params.get("n", 1))
        ctx = StepContext(self, step, micro_rows=[r for mb in self.micro_batches(size, step, 0) for r in mb])
        for state in self.stage_states.values():
            state.step = step
        run_nodes(self.program, self.plan.phases["rollout"], values, self.registry, ctx=ctx,
                  check=self._finite_signals, states=self.stage_states)
        if values[self.rollout_node].size != size:
            raise RunError(f"the rollout produced {values[self.rollout_node].size} responses; expected {size}")
        self.rollout_stage_metrics = ctx.metrics
        return values, values[self.batch_node]

    def regenerate(self, ctx: StepContext) -> list[Any]:
        node = self.program.nodes[ctx.node_id]
        sources = [src for _, src in node.inputs]
        wanted = set().union(*(_ancestors(self.program, s, stop=set()) | {s} for s in sources))
        order = [n for n in self.plan.phases["rollout"] if n in wanted]
        values = dict(self.values)
        inner = StepContext(self, ctx.step, micro_rows=ctx.micro_rows, metrics=ctx.metrics)
        run_nodes(self.program, order, values, self.registry, ctx=inner, check=self._finite_signals,
                  states=self._state_copies())
        return [values[s] for s in sources]

    def _finite_signals(self, node, value):
        """Every stage's tensor output joins the trainer's device (a plug-in verifier that builds
        its scores on the CPU must not break a CUDA run). A verifier or reward that yields
        NaN/inf for some responses: those get 0 and are counted (`rollout/nonfinite/<node>`), so
        one bad response cannot poison the step."""
        if torch.is_tensor(value) and value.device != self.device:
            value = value.to(self.device)
        if node.type.base != "Signal" or not torch.is_tensor(value) or not value.is_floating_point():
            return value
        bad = ~torch.isfinite(value)
        if not bad.any():
            return value
        key = node.binding or node.id
        self.nonfinite[key] = self.nonfinite.get(key, 0) + int(bad.sum())
        return torch.where(bad, torch.zeros_like(value), value)

    # --- update phase --------------------------------------------------------------------
    def update_phase(self, step: int, values: dict[str, Any], batch: RolloutBatch) -> dict[str, float]:
        program, cfg = self.program, self.config
        update_nodes = list(self.plan.phases["update"])
        rollout_values = {k: v for k, v in values.items() if k in set(self.plan.phases["rollout"])}
        losses: dict[str, list[float]] = {}
        approx_kl, ratios, grad_norms, entropies = [], [], [], []
        first_deviation = None  # max |ρ − 1| on the first minibatch: 0 unless behaviour log-probs are off
        self.model.train()
        if self.critic_model is not None:
            self.critic_model.train()
        for epoch in range(cfg.ppo_epochs):
            minibatches = self.micro_batches(batch.size, step, epoch)
            for mb_index, minibatch in enumerate(minibatches):
                # every aggregate divides by the whole minibatch's counts (all micro-batches, all
                # processes): the shares below add up to the minibatch's loss exactly
                scope = self._aggregation_scope(batch, minibatch)
                # a loss whose statistics span the minibatch or the batch: collected first
                spanned = [minibatch] if self.stats_scope == "mini" else minibatches
                scope_stats = (self._scope_statistics(batch, spanned, rollout_values, epoch, scope)
                               if self.stats_scope != "micro" else None)
                minibatch = self._my_rows(minibatch)
                shares: dict[str, float] = {}
                for rows in minibatch:
                    mb, mb_values, stats = self._micro_values(batch, rows, rollout_values, epoch)
                    with aggregation_scope(*scope), _maybe(scope_stats):
                        run_nodes(program, update_nodes, mb_values, self.registry, mb.mask, states=self.stage_states)
                    loss = mb_values[self.plan.objective]
                    if not torch.isfinite(loss):
                        raise RunError(f"step {step}: the objective is {float(loss)}; stopping before it "
                                       "corrupts the weights (the last checkpoint is intact)")
                    self.accelerator.backward(loss * self.world)  # DDP averages over processes; we want the sum
                    for n in update_nodes:
                        v = mb_values[n]
                        if torch.is_tensor(v) and v.dim() == 0:
                            shares[n] = shares.get(n, 0.0) + float(v.detach())
                    with torch.no_grad():
                        delta = (mb.logprobs - stats.logprobs.detach()) * mb.mask  # old − new
                        tokens = mb.mask.sum().clamp(min=1)
                        approx_kl.append(float(((torch.exp(-delta) + delta - 1) * mb.mask).sum() / tokens))
                        if stats.entropy is not None:
                            entropies.append(float(stats.entropy.sum() / tokens))
                        ratios.append(float((torch.exp(-delta) * mb.mask).sum() / tokens))
                        if epoch == 0 and mb_index == 0:
                            dev = float(((torch.exp(-delta) - 1).abs() * mb.mask).max())
                            first_deviation = max(first_deviation or 0.0, dev)
                for n, total in self._sum_over_processes(shares).items():
                    losses.setdefault(n, []).append(total)
                if cfg.max_grad_norm is not None:
                    norm = self.accelerator.clip_grad_norm_(self.trainable_parameters, cfg.max_grad_norm)
                    grad_norms.append(sharding.as_float(norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._weights_changed()
        self.scheduler.step()
        metrics = {}
        for n, vals in losses.items():
            node = program.nodes[n]
            key = f"objective/{node.binding}" if node.binding else f"node/{n}"
            metrics[key] = sum(vals) / len(vals)
        metrics["policy/approx_kl"] = sum(approx_kl) / max(1, len(approx_kl))
        metrics["policy/ratio_mean"] = sum(ratios) / max(1, len(ratios))
        metrics["policy/first_ratio_deviation"] = first_deviation or 0.0
        if entropies:  # the current policy's token entropy on the step's responses (first epoch)
            metrics["policy/entropy/mean"] = sum(entropies) / len(entropies)
        if grad_norms:
            metrics["optim/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _micro_values(self, batch: RolloutBatch, rows: "torch.Tensor", rollout_values: dict[str, Any],
                      epoch: int):
        """One micro-batch's inputs to the update nodes: the rows of every rollout-phase value,
        with the current policy's forward pass (log-probs, and entropy / values when asked)."""
        program = self.program
        temperature = float(program.nodes[self.rollout_node].params.get("temperature", 1.0))
        entropy_grad = "policy_entropy" in program.needs  # a loss term on the current policy's entropy
        want_values = "current_values" in program.needs  # a value loss: the critic's values with gradient
        update_head = self.critic.head if want_values and self.critic.shared else None
        rows = rows.to(batch.mask.device)
        mb = batch.select(rows)
        stats = token_logprobs(self.model, mb.prompt_tokens, mb.prompt_mask, mb.response_ids, mb.mask,
                               temperature=temperature, entropy=epoch == 0, entropy_grad=entropy_grad,
                               value_head=update_head)
        if self.behaviour_from_update:  # the behaviour pass, computed once, here
            mb.logprobs = stats.logprobs.detach()
            batch.logprobs[rows] = mb.logprobs
        current = {"policy_logprobs": stats.logprobs}
        if entropy_grad:
            current["policy_entropy"] = stats.entropy
        if want_values:
            current["current_values"] = stats.values if stats.values is not None else \
                self._critic_values(mb, None, grad=True)
        mb.extra.update(current)
        mb_values = {k: _rows(v, rows, batch.size) for k, v in rollout_values.items()}
        mb_values[self.batch_node] = mb
        for v in mb_values.values():  # batches derived in the rollout phase share the rows
            if isinstance(v, RolloutBatch):
                if self.behaviour_from_update:
                    v.logprobs = mb.logprobs
                v.extra.update(current)
        return mb, mb_values, stats

    @torch.no_grad()
    def _scope_statistics(self, batch: RolloutBatch, minibatches: list[list["torch.Tensor"]],
                          rollout_values: dict[str, Any], epoch: int,
                          scope: tuple[float, float, float]) -> ScopeStatistics:
        """The statistics that update-phase losses take over ``minibatches`` (the current one, or
        all of the epoch) under the current weights: the update nodes run without gradient over
        this process's micro-batches of them (the update's own), and every ``scope_reduce``
        value is combined over them and over the processes."""
        stats = ScopeStatistics()
        for micro in (rows for m in minibatches for rows in self._my_rows(m)):
            _, mb_values, _ = self._micro_values(batch, micro, rollout_values, epoch)
            with aggregation_scope(*scope), scope_statistics(stats):
                run_nodes(self.program, list(self.plan.phases["update"]), mb_values, self.registry,
                          mb_values[self.batch_node].mask, states=self._state_copies())
        stats.finish(self._reduce_over_processes if self.world > 1 else None)
        return stats

    def _reduce_over_processes(self, value: "torch.Tensor", op: str) -> "torch.Tensor":
        import torch.distributed as dist

        ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        out = value.detach().to(torch.float64).cpu().clone()
        dist.all_reduce(out, op=ops[op])
        return out.to(device=value.device, dtype=value.dtype)

    @torch.no_grad()
    def initialise_states(self, announce: "Callable[[str, int, int], None] | None" = None) -> dict[str, float]:
        """Run the initialisation pass of every stateful stage that declares one (MSSR's
        tracker starts at each prompt's success rate under the initial policy): the initial
        policy answers every prompt of the training set ``init_samples`` times, as many responses
        at a time as a training rollout (shared out between processes), the nodes between the
        rollout and the stage run on them, and the stage's ``init`` writes its state. Call once,
        before the first step of a fresh run (a resumed run has its state from the checkpoint).
        ``announce(binding, prompts, responses per prompt)`` is called as each pass starts.
        Returns ``init/<binding>/{prompts,responses,seconds}``."""
        metrics: dict[str, float] = {}
        rollout = self.program.nodes[self.rollout_node]
        params = rollout.params
        temperature = float(params.get("temperature", 1.0))
        data_node = next((src for _, src in rollout.inputs if self.program.nodes[src].type.base == "Dataset"), None)
        rollouts = {n for n in self.plan.phases["rollout"] if self.program.nodes[n].type.base == "Rollouts"}
        for node_id in self.plan.phases["rollout"]:
            node = self.program.nodes[node_id]
            st = self.registry[node.stage] if node.op == "stage" else None
            if st is None or st.init is None or int(node.params[st.init_samples]) <= 0 or data_node is None:
                continue
            t0 = time.perf_counter()
            samples = int(node.params[st.init_samples])
            dataset = self.values[data_node]
            examples = [dataset[i] for i in range(len(dataset))]
            if announce is not None:
                announce(node.binding or node_id, len(examples), samples)
            wanted = set().union(*(_ancestors(self.program, src, stop=rollouts) for _, src in node.inputs))
            order = [n for n in self.plan.phases["rollout"] if n in wanted]
            engine = self.engine(params.get("engine", "generate"), self.policy)
            # as many responses at a time as a training rollout samples
            chunk = max(1, self.config.prompts_per_step * int(params.get("n", 1)) // samples)
            for start in range(0, len(examples), chunk):
                part = examples[start:start + chunk]
                seeds = [_seed_for(self.seed, 2**40 + node.order, start + i) for i in range(len(part))]
                lo, hi = self.rank * len(part) // self.world, (self.rank + 1) * len(part) // self.world
                batch = engine.generate(part[lo:hi], n=samples, max_new_tokens=params["max_new_tokens"],
                                        temperature=temperature, top_p=params.get("top_p", 1.0),
                                        top_k=params.get("top_k", 0), chat=bool(params.get("chat", False)),
                                        seeds=seeds[lo:hi])
                batch.task = dataset
                batch = self.gather(self.complete(batch, self.policy, temperature=temperature, micro_rows=[],
                                                  training=False))
                values = dict(self.values)
                values.update({n: batch for n in rollouts})
                run_nodes(self.program, order, values, self.registry, batch.mask, check=self._finite_signals,
                          states=self._state_copies())
                st.init(*(values[src] for _, src in node.inputs), **node.params, state=self.stage_states[node_id])
            binding = node.binding or node_id
            metrics[f"init/{binding}/prompts"] = float(len(examples))
            metrics[f"init/{binding}/responses"] = float(len(examples) * samples)
            metrics[f"init/{binding}/seconds"] = time.perf_counter() - t0
        return metrics

    # --- one step ------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        torch.manual_seed(_seed_for(self.seed, step, 10**6))  # sampling depends on the step only
        t0 = time.perf_counter()
        values, batch = self.rollout_phase(step)
        self.last_batch, self.last_values = batch, values
        t1 = time.perf_counter()
        metrics = self.update_phase(step, values, batch)
        t2 = time.perf_counter()
        metrics.update(self.rollout_metrics(values, batch))  # after the update: behaviour log-probs are final
        metrics.update(self.rollout_stage_metrics)
        tokens = float(batch.mask.sum() + batch.prompt_mask.sum())
        metrics.update({
            "perf/rollout_seconds": t1 - t0,
            "perf/update_seconds": t2 - t1,
            "perf/step_seconds": t2 - t0,
            "perf/tokens_per_second": tokens / max(t2 - t0, 1e-9),
        })
        self.step_index = step + 1
        return metrics

    def rollout_metrics(self, values: dict[str, Any], batch: RolloutBatch) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for n in downstream_of(self.program, [self.rollout_node], self.plan.phases["rollout"]):
            node = self.program.nodes[n]
            prefix = f"{node.kind}/{node.binding}" if node.binding else f"node/{n}"
            for stat, v in summarize(values[n], batch.mask).items():
                metrics[f"{prefix}/{stat}"] = v
        lengths = batch.mask.sum(-1)
        metrics["rollout/response_length/mean"] = float(lengths.mean())
        metrics["rollout/response_length/max"] = float(lengths.max())
        metrics["rollout/truncated_frac"] = float(batch.truncated.float().mean())
        metrics["rollout/responses"] = float(batch.size)
        metrics["rollout/nonfinite_scores"] = float(self.nonfinite_scores)
        for key, count in self.nonfinite.items():
            metrics[f"rollout/nonfinite/{key}"] = float(count)
        for node_id, state in self.stage_states.items():
            binding = self.program.nodes[node_id].binding or node_id
            for key, v in state.metrics().items():
                metrics[f"state/{binding}/{key}"] = v
        if batch.entropy is not None:
            metrics["rollout/entropy/mean"] = float((batch.entropy * batch.mask).sum() / batch.mask.sum().clamp(min=1))
        if batch.ref_logprobs is not None:
            delta = (batch.logprobs - batch.ref_logprobs) * batch.mask
            k3 = (torch.exp(-delta) + delta - 1) * batch.mask
            metrics["policy/kl_ref/mean"] = float(k3.sum() / batch.mask.sum().clamp(min=1))
        return metrics

    # --- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, *, size: int, k: int = 1) -> dict[str, float]:
        """Held-out greedy accuracy (and pass@k with k samples) using the spec's verifiers."""
        data_node = next((src for _, src in self.program.nodes[self.rollout_node].inputs
                          if self.program.nodes[src].type.base == "Dataset"), None)
        verify = [n for n in self.plan.phases["rollout"] if self.program.nodes[n].kind == "verify"]
        if data_node is None or not verify:
            return {}
        node = self.program.nodes[data_node]
        if "split" not in node.params:
            return {}
        test = self.registry[node.stage].fn(**{**node.params, "split": "test"})
        examples = list(test.examples[:size])
        if not examples:
            return {}
        params = self.program.nodes[self.rollout_node].params
        engine = self.engine(params.get("engine", "generate"), self.policy)
        metrics = {}
        chat = bool(params.get("chat", False))
        greedy = engine.generate(examples, n=1, max_new_tokens=params["max_new_tokens"], temperature=1.0,
                                 top_p=1.0, top_k=0, greedy=True, chat=chat)
        metrics["eval/accuracy"] = self._verify_mean(greedy, test, verify[0])
        if k > 1:
            sampled = engine.generate(examples, n=k, max_new_tokens=params["max_new_tokens"],
                                      temperature=params["temperature"], top_p=params["top_p"],
                                      top_k=params["top_k"], chat=chat)
            scores = self._verify_values(sampled, test, verify[0]).view(len(examples), k)
            metrics[f"eval/pass@{k}"] = float((scores > 0.5).any(-1).float().mean())
        return metrics

    def _verify_values(self, batch: RolloutBatch, task, verify_node: str) -> "torch.Tensor":
        batch.task = task
        order, values = self._on_batch(batch, verify_node)
        run_nodes(self.program, order, values, self.registry, batch.mask, states=self._state_copies())
        return values[verify_node].float()

    def _on_batch(self, batch: RolloutBatch, target: str) -> tuple[list[str], dict[str, Any]]:
        """The rollout-phase nodes that ``target`` needs, to run on another batch (a greedy
        rollout, an evaluation): every Rollouts value of the graph is that batch (a filter or
        a re-mask of the training rollouts has no meaning there), and the nodes between it and
        ``target`` run in order."""
        rollouts = {n for n in self.plan.phases["rollout"] if self.program.nodes[n].type.base == "Rollouts"}
        wanted = _ancestors(self.program, target, stop=rollouts)
        values = dict(self.values)
        values.update({n: batch for n in rollouts})
        return [n for n in self.plan.phases["rollout"] if n in wanted], values

    def _verify_mean(self, batch, task, verify_node) -> float:
        return float(self._verify_values(batch, task, verify_node).mean())

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The run's state for a checkpoint. Under FSDP the weights and the optimizer state are
        gathered (full, on the first process): every process must call it."""
        if self.fsdp is not None:
            weights, optim = sharding.checkpoint_state(self.model, getattr(self.optimizer, "optimizer", self.optimizer))
        else:
            weights, optim = self.accelerator.unwrap_model(self.model).state_dict(), self.optimizer.state_dict()
        return {
            "step": self.step_index,
            "model": weights,
            "optimizer": optim,
            "scheduler": self.scheduler.state_dict(),
            "samplers": {str(i): s.state_dict() for i, s in enumerate(self._ordered_samplers())},
            "rng": {"torch": torch.get_rng_state()},
            "stage_state": {node_id: st.state_dict() for node_id, st in self.stage_states.items()},
            **({"critic": self.accelerator.unwrap_model(self.critic_model).state_dict()}
               if self.critic is not None and not self.critic.shared else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fsdp is not None:  # every process holds the full state: each keeps its shard
            sharding.load_checkpoint_state(self.model, getattr(self.optimizer, "optimizer", self.optimizer),
                                           state["model"], state["optimizer"])
        else:
            self.accelerator.unwrap_model(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._weights_changed()  # the full copy (FSDP) and the engines that hold weights get the loaded ones
        self.scheduler.load_state_dict(state["scheduler"])
        for sampler, s in zip(self._ordered_samplers(), state["samplers"].values()):
            sampler.load_state_dict(s)
        torch.set_rng_state(state["rng"]["torch"])
        self.step_index = state["step"]
        if self.critic is not None and not self.critic.shared:
            self.accelerator.unwrap_model(self.critic_model).load_state_dict(state["critic"])
        saved = state.get("stage_state", {})
        for node_id, st in self.stage_states.items():
            if node_id in saved:
                st.load_state_dict(saved[node_id])

    def _critic_values(self, batch: RolloutBatch, rows, *, grad: bool) -> "torch.Tensor":
        """V(s_t) from a separate critic (a shared head's values come with the policy's forward)."""
        b = batch if rows is None else batch.select(rows)
        model = self.critic_model if grad else self.accelerator.unwrap_model(self.critic_model)
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            return token_values(model, self.critic.head, b.prompt_tokens, b.prompt_mask, b.response_ids, b.mask)

    def _state_copies(self) -> dict:
        """The stage states as copies: a second run of some nodes (the greedy baseline, an
        evaluation) sees the current state but must not advance it."""
        return {node_id: st.copy() for node_id, st in self.stage_states.items()}

    def _ordered_samplers(self) -> list[PromptSampler]:
        """Samplers in the order of the data nodes of the plan (stable across processes)."""
        out = []
        for n in self.plan.phases["setup"]:
            v = self.values.get(n)
            if self.program.nodes[n].type.base == "Dataset":
                out.append(self.sampler_for(v))
        return out


@contextmanager
def _maybe(stats: ScopeStatistics | None):
    """Serve ``scope_reduce`` from ``stats`` when a loss's statistics span more than its micro-batch."""
    if stats is None:
        yield
    else:
        with scope_statistics(stats):
            yield


def _rows(value: Any, rows: "torch.Tensor", size: int) -> Any:
    """The micro-batch's rows of a rollout-phase value: (B, ...) tensors and batches are sliced."""
    if isinstance(value, RolloutBatch):
        return value.select(rows) if value.size == size else value
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == size:
        return value.index_select(0, rows)
    return value


def _ancestors(program: Program, node_id: str, stop: set[str]) -> set[str]:
    out, stack = set(), [node_id]
    while stack:
        n = stack.pop()
        if n in out or n in stop:
            continue
        out.add(n)
        stack.extend(src for _, src in program.nodes[n].inputs)
    return out
