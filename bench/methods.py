"""What each shaping method's stages and needs cost per training step, against GRPO, on the embedded task.

Every method spec in specs/ (and grpo.shape as the reference) is trained in-process on the embedded
`builtin:arith-tiny` model, on the CPU, for W untimed warm-up steps and N timed steps, each on a
fresh Trainer (fresh weights, fresh stage states). GRPO is also run at each other size a method
spec sets: responses per step (`<rollout>.n=…`, `train.prompts_per_step=…`) and update structure
(`train.ppo_epochs`, `minibatches`, `grad_accum`), so that every method is compared with GRPO doing
the same amount of sampling and the same number of forward/backward passes. All trainers of a
round are alive at once and take their steps in turn (step k of every spec, then step k + 1 in the
reverse order), so drift on a busy machine affects all alike; ×grpo is the median of the paired
per-step ratios, the other figures are medians over the timed steps of all rounds. One torch
thread by default (`--threads`): on a busy 2-core machine, 2 threads made steps erratic.

Nothing in shapeflow/ is changed; the benchmark hooks, from outside:

    run_nodes        (shapeflow.runtime.trainer's reference to it) runs one node at a time under a
                     timer: every node's inclusive and exclusive time per step
    token_logprobs   (the same) timed and its flags recorded: which pass (behaviour inside
                     `Trainer.complete`, reference, update) with which extras (entropy, hidden
                     states, full-logit reductions)
    Trainer.complete and the engine's `generate`, timed (per trainer instance)

Columns of the table:

    step         `perf/step_seconds` of `Trainer.train_step`
    ×grpo        step / the same step of GRPO at the same size (median of the paired ratios)
    method       time inside the method's own stages: the nodes whose stage GRPO's spec does not
                 use (forward only: a loss stage's backward is part of the update's backward),
                 inclusive of what they run (a dynamic-sampling stage's regenerations count)
    % step       method / step, the median of the per-step fractions
    behaviour    the separate no-grad behaviour pass in `complete` (0 when the update's own
                 forward doubles as it: one on-policy update and no rollout-phase need of
                 log-probs, entropy, hidden states, values or full-logit reductions)
    needs        program.needs beyond grpo.shape's (and, after "−", those grpo has and it lacks)

Then, on one batch (GRPO's last, 16 × 8 responses), the behaviour pass `token_logprobs` alone
with GRPO's needs (log-probs only) against each distinct set of method needs, and the update
forward with and without its entropy statistic; then the check that GRPO computes none of the
optional needs.

    .venv/bin/python bench/methods.py                      # the table (~1.5 min on 2 cores)
    .venv/bin/python bench/methods.py --rounds 3           # steadier (~2 min)
    .venv/bin/python bench/methods.py --only verl_er ucas  # a few methods (+ the grpo runs they need)
    .venv/bin/python bench/methods.py --json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("ucas", "canon", "mssr", "aspo", "par", "verl_er", "g2rpo", "adora", "advevo_marl", "grpo_n", "xrpo",
           "r3", "steer", "dcpo")
OPTIONAL_NEEDS = ("entropy", "hidden_states", "self_certainty", "sampled_logit", "sum_pi_squared")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# the probe: timers around run_nodes, token_logprobs, complete and generate
# --------------------------------------------------------------------------------------------


class Probe:
    """Per-step accumulators, filled by the hooks; a stack gives exclusive times."""

    def __init__(self):
        self.base_stages: frozenset[str] = frozenset()
        self.trainer = None
        self.stack: list[list[float]] = []  # [start, time of timed children]
        self.in_complete = 0
        self.method_depth = 0
        self.reset()
        self.calls: dict[tuple, int] = {}  # (pass, entropy, entropy_grad, hidden, extras) -> count, whole run

    def reset(self):
        self.node_incl: dict[str, float] = {}
        self.node_excl: dict[str, float] = {}
        self.totals = {"method_s": 0.0, "generate_s": 0.0, "behaviour_s": 0.0, "reference_s": 0.0,
                       "update_forward_s": 0.0, "complete_s": 0.0}

    def take(self) -> dict:
        out = {**self.totals, "node_incl": dict(self.node_incl), "node_excl": dict(self.node_excl)}
        self.reset()
        return out

    @contextmanager
    def timed(self):
        """Yields a list that receives (inclusive, exclusive) seconds."""
        res = []
        self.stack.append([time.perf_counter(), 0.0])
        try:
            yield res
        finally:
            start, children = self.stack.pop()
            incl = time.perf_counter() - start
            if self.stack:
                self.stack[-1][1] += incl
            res.extend((incl, incl - children))


PROBE = Probe()


def install_hooks():
    import shapeflow.runtime.trainer as trainer_mod

    if getattr(trainer_mod, "_bench_methods_hooked", False):
        return
    orig_run_nodes, orig_token_logprobs = trainer_mod.run_nodes, trainer_mod.token_logprobs

    def run_nodes(program, order, values, registry, mask=None, ctx=None, check=None, states=None):
        for node_id in order:
            node = program.nodes[node_id]
            is_method = node.op == "stage" and node.stage not in PROBE.base_stages
            top = is_method and PROBE.method_depth == 0
            PROBE.method_depth += is_method
            try:
                with PROBE.timed() as t:
                    orig_run_nodes(program, [node_id], values, registry, mask, ctx, check, states)
            finally:
                PROBE.method_depth -= is_method
            PROBE.node_incl[node_id] = PROBE.node_incl.get(node_id, 0.0) + t[0]
            PROBE.node_excl[node_id] = PROBE.node_excl.get(node_id, 0.0) + t[1]
            if top:
                PROBE.totals["method_s"] += t[0]
        return values

    def token_logprobs(model, *args, **kw):
        tr = PROBE.trainer
        if PROBE.in_complete:
            which = "reference" if tr is not None and model is tr.reference else "behaviour"
        else:
            which = "update"
        key = (which, bool(kw.get("entropy")), bool(kw.get("entropy_grad")), bool(kw.get("hidden")),
               tuple(sorted(kw.get("extras") or ())))
        PROBE.calls[key] = PROBE.calls.get(key, 0) + 1
        with PROBE.timed() as t:
            out = orig_token_logprobs(model, *args, **kw)
        PROBE.totals[{"reference": "reference_s", "behaviour": "behaviour_s", "update": "update_forward_s"}[which]] \
            += t[0]
        return out

    trainer_mod.run_nodes = run_nodes
    trainer_mod.token_logprobs = token_logprobs
    trainer_mod._bench_methods_hooked = True


def hook_trainer(trainer):
    orig_complete = trainer.complete

    def complete(*args, **kw):
        PROBE.in_complete += 1
        try:
            with PROBE.timed() as t:
                return orig_complete(*args, **kw)
        finally:
            PROBE.in_complete -= 1
            PROBE.totals["complete_s"] += t[0]

    trainer.complete = complete
    engine = trainer.engine("generate", trainer.policy)  # the instance the rollout stage uses
    orig_generate = engine.generate

    def generate(*args, **kw):
        with PROBE.timed() as t:
            out = orig_generate(*args, **kw)
        PROBE.totals["generate_s"] += t[0]
        return out

    engine.generate = generate
    return engine


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


def compile_program(name: str, sets: list[str]):
    from shapeflow.compiler.pipeline import build_plan, compile_spec

    compiled = compile_spec(ROOT / "specs" / f"{name}.shape", sets=sets)
    if not compiled.ok:
        raise SystemExit(f"{name}.shape does not compile:\n" + "\n".join(str(d) for d in compiled.diagnostics))
    _, plan = build_plan(compiled.program)
    return compiled.program, plan


def rollout_node(program):
    nodes = [n for n in program.nodes.values() if n.stage == "rollouts.sample"]
    if len(nodes) != 1:
        raise SystemExit(f"expected one rollouts.sample node, found {len(nodes)}")
    return nodes[0]


def shape_of(program) -> dict:
    cfg, ro = program.config["train"], rollout_node(program)
    return {"n": int(ro.params["n"]), "prompts": int(cfg.prompts_per_step),
            "rollout": {k: ro.params[k] for k in ("max_new_tokens", "temperature", "top_p", "top_k")},
            "train": {k: getattr(cfg, k) for k in ("ppo_epochs", "minibatches", "grad_accum", "max_grad_norm",
                                                   "weight_decay", "lr")}}


def differences(program, grpo_program) -> list[str]:
    """Settings of the spec that differ from grpo.shape's, besides its stages."""
    a, b = shape_of(program), shape_of(grpo_program)
    out = []
    if (a["n"], a["prompts"]) != (b["n"], b["prompts"]):
        out.append(f"{a['prompts']}×{a['n']}")
    for group in ("rollout", "train"):
        for k, v in a[group].items():
            if v != b[group][k]:
                out.append(f"{k} {v}")
    if "ref_logprobs" not in program.needs and "ref_logprobs" in grpo_program.needs:
        out.append("no KL: no reference pass")
    return out


# --------------------------------------------------------------------------------------------
# one run: a fresh Trainer, W + N steps
# --------------------------------------------------------------------------------------------


class Run:
    """One spec's fresh Trainer (fresh weights, fresh stage states) and its timed steps."""

    def __init__(self, program, plan):
        from shapeflow.runtime.trainer import Trainer
        from shapeflow.stdlib.registry import default_registry

        self.trainer = Trainer(program, plan, default_registry(), program.config["train"], device="cpu")
        t0 = time.perf_counter()
        self.trainer.setup()
        self.setup_s = time.perf_counter() - t0
        self.engine = hook_trainer(self.trainer)
        self.calls: dict[str, int] = {}
        self.rows: list[dict] = []

    def step(self, step: int, timed: bool) -> None:
        PROBE.trainer, PROBE.calls = self.trainer, {}
        PROBE.reset()
        m = self.trainer.train_step(step)
        p = PROBE.take()
        for k, v in PROBE.calls.items():
            key = "|".join([*map(str, k[:4]), "+".join(k[4])])  # pass|entropy|entropy_grad|hidden|extras
            self.calls[key] = self.calls.get(key, 0) + v
        PROBE.trainer = None
        if timed:
            self.rows.append({"step": step, "step_s": m["perf/step_seconds"], "rollout_s": m["perf/rollout_seconds"],
                              "update_s": m["perf/update_seconds"], "responses": m["rollout/responses"],
                              "response_length": m["rollout/response_length/mean"],
                              # dynamic sampling's generation rounds this step (`rollout/<binding>/rounds`)
                              "regen_rounds": next((v for k, v in m.items() if k.startswith("rollout/")
                                                    and k.endswith("/rounds")), None), **p})

    def finish(self, keep: bool = False) -> dict:
        tr, batch = self.trainer, self.trainer.last_batch
        out = {"setup_s": self.setup_s, "rows": self.rows, "calls": self.calls,
               "token_extras": sorted(tr.token_extras), "behaviour_from_update": tr.behaviour_from_update,
               "batch_entropy": batch.entropy is not None, "batch_extra": sorted(batch.extra)}
        del self.engine.generate
        if keep:
            out["trainer"] = tr
        self.trainer = self.engine = None
        return out


# --------------------------------------------------------------------------------------------
# the behaviour pass alone, on one batch
# --------------------------------------------------------------------------------------------


def time_alternating(fns: dict, repeats: int, min_s: float) -> dict[str, list[float]]:
    """Per-call seconds of each callable: 2 warm-up calls, then `repeats` samples, alternating the
    order (A B C, C B A, ...); each sample averages enough calls to last >= min_s."""
    names = list(fns)
    counts = {}
    for name in names:
        fns[name](), fns[name]()
        t = time.perf_counter()
        fns[name]()
        one = max(time.perf_counter() - t, 1e-6)
        counts[name] = max(1, int(min_s / one))
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            k = counts[name]
            t = time.perf_counter()
            for _ in range(k):
                fns[name]()
            samples[name].append((time.perf_counter() - t) / k)
    return samples


def behaviour_micro(trainer, method_needs: dict[str, frozenset], repeats: int, min_s: float) -> dict:
    """`token_logprobs` on the last batch of `trainer` (GRPO's), no grad, with the flags
    `Trainer.complete` would pass for each set of needs; and the update forward (with grad, no
    backward) with and without its entropy statistic."""
    import torch

    from shapeflow.runtime.engine import token_logprobs, token_needs  # the originals, not the hooks

    batch = trainer.last_batch
    model = trainer.accelerator.unwrap_model(trainer.model)
    temperature = 1.0
    args = (batch.prompt_tokens, batch.prompt_mask, batch.response_ids, batch.mask)

    def flags(needs):
        return {"entropy": "entropy" in needs, "hidden": "hidden_states" in needs, "extras": token_needs(needs)}

    configs: dict[str, dict] = {}
    users: dict[str, list[str]] = {}
    for method, needs in method_needs.items():
        f = flags(needs)
        label = ", ".join([k for k in ("entropy", "hidden") if f[k]] + sorted(f["extras"])) or "log-probs only"
        configs.setdefault(label, f)
        users.setdefault(label, []).append(method)
    everything = {"entropy": True, "hidden": True,
                  "extras": frozenset({"self_certainty", "sampled_logit", "sum_pi_squared", "logprobs@0.8",
                                       "logprobs@1.2"})}
    configs.setdefault("all of them", everything)
    users.setdefault("all of them", [])
    base_label = "log-probs only"
    configs = {base_label: configs.pop(base_label, flags(frozenset())), **configs}

    def behaviour(f):
        def call():
            with torch.no_grad():
                token_logprobs(model, *args, temperature=temperature, **f)
        return call

    def update(entropy):
        def call():
            token_logprobs(model, *args, temperature=temperature, entropy=entropy)
        return call

    fns = {f"behaviour: {label}": behaviour(f) for label, f in configs.items()}
    fns["update forward: log-probs only"] = update(False)
    fns["update forward: + entropy statistic"] = update(True)
    samples = time_alternating(fns, repeats, min_s)
    rows = []
    base = median(samples[f"behaviour: {base_label}"])
    for label in configs:
        s = median(samples[f"behaviour: {label}"])
        rows.append({"pass": "behaviour (no grad)", "computes": label, "ms": 1e3 * s, "ratio": s / base,
                     "methods": users[label], "samples_ms": [1e3 * x for x in samples[f"behaviour: {label}"]]})
    ubase = median(samples["update forward: log-probs only"])
    for label in ("log-probs only", "+ entropy statistic"):
        s = median(samples[f"update forward: {label}"])
        rows.append({"pass": "update forward (grad, no backward)", "computes": label, "ms": 1e3 * s,
                     "ratio": s / ubase, "methods": [],
                     "samples_ms": [1e3 * x for x in samples[f"update forward: {label}"]]})
    return {"responses": batch.size, "tokens": int(batch.mask.sum()), "T": batch.mask.shape[1], "rows": rows}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
    rows = [r for res in runs for r in res["rows"]]
    out = {k: median([r[k] for r in rows]) for k in ("step_s", "rollout_s", "update_s", "method_s", "generate_s",
                                                     "behaviour_s", "reference_s", "update_forward_s",
                                                     "response_length", "responses")}
    out["method_frac"] = median([r["method_s"] / r["step_s"] for r in rows])
    out["behaviour_frac"] = median([r["behaviour_s"] / r["step_s"] for r in rows])
    rounds = [r["regen_rounds"] for r in rows if r["regen_rounds"] is not None]
    out["regen_rounds"] = statistics.fmean(rounds) if rounds else float("nan")
    out["per_round_step_s"] = [median([r["step_s"] for r in res["rows"]]) for res in runs]
    out["steps"] = len(rows)
    nodes = {}
    for r in rows:
        for k in r["node_excl"]:
            nodes.setdefault(k, []).append(r["node_excl"][k])
    out["node_excl_s"] = {k: median(v) for k, v in nodes.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per run before them (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (default 2: forwards, then backwards)")
    ap.add_argument("--only", nargs="+", metavar="SPEC", help=f"methods to run (default all: {' '.join(METHODS)})")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with 2 on a busy 2-core machine, OpenMP's waiting made steps "
                         "up to 10x slower and erratic; 0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=9, help="samples of each behaviour-pass variant (default 9)")
    ap.add_argument("--min-sample", type=float, default=0.1,
                    help="seconds each behaviour-pass sample lasts (default 0.1)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    methods = list(args.only or METHODS)
    unknown = [m for m in methods if not (ROOT / "specs" / f"{m}.shape").is_file()]
    if unknown:
        raise SystemExit(f"no such spec: {unknown}")
    total = args.warmup + args.steps
    grpo_program, _ = compile_program("grpo", [f"train.steps={total}"])
    PROBE.base_stages = frozenset(n.stage for n in grpo_program.nodes.values() if n.stage)
    install_hooks()

    # every method at its own settings; grpo at each size a method uses: responses per step
    # (n, prompts) and the update's structure (epochs, minibatches, micro-batches)
    def size_of(program):
        s = shape_of(program)
        return (s["n"], s["prompts"], s["train"]["ppo_epochs"], s["train"]["minibatches"], s["train"]["grad_accum"])

    programs, sizes = {}, {}
    for m in methods:
        programs[m] = compile_program(m, [f"train.steps={total}"])
        sizes[m] = size_of(programs[m][0])
    base = size_of(grpo_program)
    size_order = [base] + sorted({sizes[m] for m in methods} - {base})
    grpo_name = {}
    sequence = []
    binding = rollout_node(grpo_program).binding
    for size in size_order:
        n, prompts, epochs, minibatches, accum = size
        name = "grpo"
        if size != base:
            name = f"grpo@{prompts}x{n}" + "".join(f",{k}{v}" for k, v, b in (("epochs", epochs, base[2]),
                                                                              ("mb", minibatches, base[3]),
                                                                              ("ga", accum, base[4])) if v != b)
        grpo_name[size] = name
        sizes[name] = size
        programs[name] = compile_program("grpo", [f"train.steps={total}", f"{binding}.n={n}",
                                                  f"train.prompts_per_step={prompts}", f"train.ppo_epochs={epochs}",
                                                  f"train.minibatches={minibatches}", f"train.grad_accum={accum}"])
        sequence.append(name)
        sequence += [m for m in methods if sizes[m] == size]

    grpo_runs = set(grpo_name.values())
    results: dict[str, list[dict]] = {name: [] for name in sequence}
    micro_trainer = None
    t_all = time.perf_counter()
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: setting up {len(sequence)} trainers", file=sys.stderr, flush=True)
        runs = {name: Run(*programs[name]) for name in sequence}
        for step in range(total):
            print(f"round {r + 1}/{args.rounds}: step {step + 1}/{total}", file=sys.stderr, flush=True)
            forwards = (r * total + step) % 2 == 0
            for name in sequence if forwards else reversed(sequence):
                runs[name].step(step, timed=step >= args.warmup)
                if torch.get_num_threads() != threads:
                    raise SystemExit(f"{name} changed the torch thread count")
        for name in sequence:
            keep = name == "grpo" and r == args.rounds - 1
            res = runs.pop(name).finish(keep=keep)
            if keep:
                micro_trainer = res.pop("trainer")
            res["round"] = r
            results[name].append(res)
        del runs
        gc.collect()
    train_s = time.perf_counter() - t_all

    print("behaviour pass on one batch", file=sys.stderr, flush=True)
    method_needs = {"grpo": grpo_program.needs, **{m: programs[m][0].needs for m in methods}}
    micro = behaviour_micro(micro_trainer, method_needs, args.repeats, args.min_sample)

    # the check: grpo computes none of the optional needs
    grpo_results = results["grpo"]
    grpo_calls = {}
    for res in grpo_results:
        for k, v in res["calls"].items():
            grpo_calls[k] = grpo_calls.get(k, 0) + v
    check = {
        "program_needs": sorted(grpo_program.needs),
        "optional_needs_in_program": sorted(set(grpo_program.needs) & set(OPTIONAL_NEEDS)),
        "token_extras": grpo_results[-1]["token_extras"],
        "behaviour_from_update": grpo_results[-1]["behaviour_from_update"],
        "batch_entropy": grpo_results[-1]["batch_entropy"],
        "batch_extra": grpo_results[-1]["batch_extra"],
        "token_logprobs_calls": grpo_calls,
        "steps": total * len(grpo_results),
    }

    summary = {}
    for name in sequence:
        program = programs[name][0]
        s = summarise(results[name])
        ref = grpo_name[sizes[name]]
        s["grpo_ref"] = ref
        s["needs_extra"] = sorted(set(program.needs) - set(grpo_program.needs))
        s["needs_missing"] = sorted(set(grpo_program.needs) - set(program.needs))
        plan = programs[name][1]
        # behaviour log-probs read before the update: they cannot come from the update's forward
        s["logprobs_in_rollout"] = any("logprobs" in program.nodes[n].needs for n in plan.phases["rollout"])
        s["differs"] = differences(program, grpo_program) if name not in grpo_runs else []
        s["behaviour_from_update"] = results[name][-1]["behaviour_from_update"]
        s["token_extras"] = results[name][-1]["token_extras"]
        s["method_nodes"] = [f"{n.binding + ' = ' if n.binding else ''}{n.stage}" for n in program.nodes.values()
                             if n.stage and n.stage not in PROBE.base_stages]
        label = {k: f"{program.nodes[k].binding or k}:{program.nodes[k].stage or program.nodes[k].op}"
                 for k in s["node_excl_s"]}
        s["method_node_excl_s"] = {label[k]: v for k, v in s["node_excl_s"].items()
                                   if program.nodes[k].stage and program.nodes[k].stage not in PROBE.base_stages}
        s["node_excl_s"] = {label[k]: v for k, v in s["node_excl_s"].items()}
        calls: dict[str, int] = {}
        for res in results[name]:
            for k, v in res["calls"].items():
                calls[k] = calls.get(k, 0) + v
        s["calls"] = calls
        summary[name] = s
    for name, s in summary.items():
        # paired: each timed step against the same step of the GRPO run beside it (same round)
        pairs = [a["step_s"] / b["step_s"] for ra, rb in zip(results[name], results[s["grpo_ref"]])
                 for a, b in zip(ra["rows"], rb["rows"])]
        s["ratio_vs_grpo"] = median(pairs)
        s["ratio_of_medians_vs_grpo"] = s["step_s"] / summary[s["grpo_ref"]]["step_s"]

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {threads}",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds, "train_wall_s": train_s,
        "command": "bench/methods.py " + " ".join(sys.argv[1:]),
    }
    if args.json:
        def strict(x):
            if isinstance(x, dict):
                return {str(k): strict(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [strict(v) for v in x]
            return None if isinstance(x, float) and x != x else x

        print(json.dumps(strict({"meta": meta, "summary": summary, "behaviour_micro": micro, "grpo_check": check}),
                         indent=2))
        return 0

    def ms(x):
        return "-" if x != x else f"{1e3 * x:.1f}"

    print(f"{meta['date']}  {meta['machine']}  Python {meta['python']}  torch {meta['torch']}  "
          f"transformers {meta['transformers']}")
    print(f"{args.rounds} rounds × ({args.warmup} warm-up + {args.steps} timed steps) per spec, builtin:arith-tiny, "
          f"CPU; medians in ms; training took {train_s:.0f} s")
    print()
    print("| spec | prompts×n | resp. len | step | ×grpo (same size) | rollout | update | method stages | % step | "
          "behaviour pass (% step) | reference pass | extra needs | differs from grpo besides its stages |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for name in sequence:
        s = summary[name]
        n, p = sizes[name][:2]
        ratio = "1 (ref.)" if name == s["grpo_ref"] else f"{s['ratio_vs_grpo']:.2f}"
        needs = ", ".join(s["needs_extra"] + (["logprobs in the rollout phase"] if s["logprobs_in_rollout"] else []))
        if s["needs_missing"]:
            needs += (" " if needs else "") + "− " + ", ".join(s["needs_missing"])
        differs = "; ".join(d for d in s["differs"] if not d.startswith(f"{p}×")) or "-"
        if s["regen_rounds"] == s["regen_rounds"]:
            differs += f"; {s['regen_rounds']:.1f} generation rounds per step (mean)"
        method = "-" if name in grpo_runs else ms(s["method_s"])
        frac = "-" if name in grpo_runs else f"{100 * s['method_frac']:.1f}%"
        behaviour = ms(s["behaviour_s"]) + (f" ({100 * s['behaviour_frac']:.0f}%)" if s["behaviour_s"] > 0 else "")
        print(f"| {name} | {p}×{n} | {s['response_length']:.2f} | {ms(s['step_s'])} | {ratio} | "
              f"{ms(s['rollout_s'])} | "
              f"{ms(s['update_s'])} | {method} | {frac} | {behaviour} | {ms(s['reference_s'])} | {needs or '-'} | "
              f"{differs} |")
    print()
    print("Method stages (exclusive ms per step, median), and what each token_logprobs pass computed "
          "(over all steps; `update` computes the entropy statistic for the `policy/entropy/mean` metric):")
    for name in sequence:
        s = summary[name]
        parts = [f"{k} {1e3 * v:.2f}" for k, v in s["method_node_excl_s"].items()]
        passes = {}
        for key in s["calls"]:
            which, entropy, entropy_grad, hidden, extras = key.split("|")
            what = [w for w, on in (("entropy", entropy), ("entropy_grad", entropy_grad), ("hidden", hidden))
                    if on == "True"] + [x for x in extras.split("+") if x]
            passes.setdefault(which, set()).update(what)
        passes_s = ", ".join(f"{w}{{{', '.join(sorted(passes[w]))}}}" for w in ("behaviour", "reference", "update")
                             if w in passes)
        print(f"- {name}: " + (", ".join(parts) or "-") + f"; passes: {passes_s}")
    print()
    print(f"Behaviour pass alone, on GRPO's last batch ({micro['responses']} responses, {micro['tokens']} tokens, "
          f"T = {micro['T']}), {args.repeats} alternating samples, median ms per call:")
    print()
    print("| pass | computes | ms | × log-probs only | specs that need it |")
    print("|---|---|---:|---:|---|")
    for row in micro["rows"]:
        print(f"| {row['pass']} | {row['computes']} | {row['ms']:.2f} | {row['ratio']:.2f} | "
              f"{', '.join(row['methods']) or '-'} |")
    print()
    print(f"GRPO check ({check['steps']} steps in {len(grpo_results)} runs): optional needs in program.needs: "
          f"{check['optional_needs_in_program'] or 'none'}; trainer.token_extras = {check['token_extras'] or '{}'}; "
          f"behaviour_from_update = {check['behaviour_from_update']}; batch.entropy is None: "
          f"{not check['batch_entropy']}; batch.extra keys: {check['batch_extra'] or 'none'}")
    print("token_logprobs calls (pass|entropy|entropy_grad|hidden|extras: count): "
          + "; ".join(f"{k}: {v}" for k, v in sorted(check["token_logprobs_calls"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
