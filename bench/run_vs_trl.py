"""Step time of shapeflow's GRPO (specs/grpo.shape) against TRL's GRPOTrainer, same work, same process.

Both train the same weights (the cached `builtin:arith-tiny` folder, loaded fresh for every
run), with the same tokenizer, on the same prompts (the train split of 2-digit + 1-digit
addition, drawn in the order shapeflow's sampler draws them), 16 prompts x 8 responses per
step, at most 5 new tokens, temperature 1.0 with no top-k / top-p, AdamW (fused) at lr 1e-4,
constant schedule, grad-norm clip 1.0, PPO clip 0.2 with a token-mean loss, a k3 KL term
with coefficient 0.001 against a frozen reference model, one update per rollout, fp32, on
the CPU, with the same torch thread count. The reward is exact match of the stripped
response against the answer (1.0 / 0.0) for both.

Runs alternate in one process: round 1 runs shapeflow then TRL, round 2 TRL then shapeflow,
and so on, so drift on a busy machine affects both alike. Each run does W untimed warm-up
steps, then N timed steps; the script prints the median over all timed steps of all rounds
(and each round's median) and the ratio TRL / shapeflow of the median step times.

Where the time goes, for both:
    step      shapeflow: `perf/step_seconds` of `Trainer.train_step` (rollout + update);
              TRL: from `on_step_begin` to `on_step_end` of a TrainerCallback (one optimizer step)
    rollout   shapeflow: `perf/rollout_seconds` (sampling, behaviour and reference log-probs,
              verify, reward, advantage); TRL: `_generate_and_score_completions` (the same work,
              without a separate behaviour log-prob pass, see below)
    generate  the sampling call alone: shapeflow's `GenerateEngine.generate` (its own key/value-cache
              loop, each prompt prefilled once per group), TRL's Hugging Face `model.generate`
    update    step - rollout (loss forward/backward, clip, optimizer step, metrics)
    cycle     wall time from the start of one step to the start of the next (adds TRL's
              logging and data loading, and shapeflow's nothing)

    .venv/bin/pip install trl "torch==2.13.0"
    .venv/bin/python bench/run_vs_trl.py --steps 30
    .venv/bin/python bench/run_vs_trl.py --steps 30 --rounds 4 --json
    .venv/bin/python bench/run_vs_trl.py --steps 30 --profile 40      # cProfile of shapeflow's timed steps
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import cProfile
import io
import json
import os
import pickle
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers the kernels it launched."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Timed:
    """Wraps a callable; adds the wall time of each call to ``total`` (reset per step)."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        synchronize()
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            synchronize()
            self.total += time.perf_counter() - t
            self.calls += 1

    def take(self) -> float:
        total, self.total = self.total, 0.0
        return total


def exact_match_rewards(completions, answer, **_):
    """TRL reward function: 1.0 where the stripped completion equals the answer, else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# the spec, and what TRL must match
# --------------------------------------------------------------------------------------------


def load_spec(path: Path, total_steps: int, sets: list[str] = ()):
    from shapeflow.compiler.pipeline import build_plan, compile_spec

    compiled = compile_spec(path, sets=[f"train.steps={total_steps}", *sets])
    if not compiled.ok:
        raise SystemExit(f"{path} does not compile:\n" + "\n".join(str(d) for d in compiled.diagnostics))
    program = compiled.program
    _, plan = build_plan(program)
    return program, plan


def spec_settings(program) -> dict:
    """The settings of the spec that TRL has to be given; stops if the spec is not the GRPO shape
    this benchmark knows how to mirror (one rollout, ppo_clip + coef * kl, exact_answer reward)."""
    nodes = program.nodes
    by_stage = {}
    for n in nodes.values():
        if n.stage:
            by_stage.setdefault(n.stage, []).append(n)

    def one(stage):
        found = by_stage.get(stage, [])
        if len(found) != 1:
            raise SystemExit(f"spec: expected exactly one {stage} stage, found {len(found)}")
        return found[0]

    sample, data, model = one("rollouts.sample"), one("tasks.arithmetic"), one("models.causal_lm")
    clip, kl, verify = one("losses.ppo_clip"), one("losses.kl"), one("verifiers.exact_answer")
    kl_id = next(i for i, n in nodes.items() if n is kl)
    scaled = [n for n in nodes.values() if n.stage is None and dict(n.inputs).get("right") == kl_id
              and "left" in n.params]
    if len(scaled) != 1:
        raise SystemExit("spec: expected the KL term as `coef * losses.kl(...)`")
    cfg = program.config["train"]
    if (cfg.ppo_epochs, cfg.minibatches, cfg.grad_accum) != (1, 1, 1):
        raise SystemExit("spec: this benchmark mirrors one on-policy update per rollout")
    if clip.params["agg"] != "token-mean" or kl.params["agg"] != "token-mean" or kl.params["estimator"] != "k3":
        raise SystemExit("spec: expected token-mean ppo_clip and token-mean k3 KL (TRL loss_type='dapo', beta)")
    if verify.params["extract"] is not None or not verify.params["strip"]:
        raise SystemExit("spec: expected exact_answer with strip = true and no extract")
    return {
        "model": model.params["path"],
        "data": {k: data.params[k] for k in ("digits", "second_digits", "split", "test_fraction", "size", "seed")},
        "group_size": sample.params["n"],
        "max_new_tokens": sample.params["max_new_tokens"],
        "temperature": sample.params["temperature"],
        "top_p": sample.params["top_p"],
        "top_k": sample.params["top_k"],
        "prompts_per_step": cfg.prompts_per_step,
        "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "betas": list(cfg.betas),
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "eps_low": clip.params["eps_low"],
        "eps_high": clip.params["eps_high"],
        "kl_coef": float(scaled[0].params["left"]),
    }


# --------------------------------------------------------------------------------------------
# a ~0.5B-parameter random-init model (the GPU comparison)
# --------------------------------------------------------------------------------------------

QWEN25_05B = dict(  # Qwen2.5-0.5B's shape: 494M parameters with its 151,936-token vocabulary
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
    tie_word_embeddings=True,
)


def random_qwen2_folder(folder: Path, seed: int = 0) -> Path:
    """A Qwen2 with Qwen2.5-0.5B's shape and random weights, saved as a Hugging Face folder with
    the embedded character tokenizer padded with filler tokens to the model's vocabulary (so every
    sampled id decodes). Untrained, it almost never samples <eos>: responses run to the length
    limit, rewards are all 0 (all-equal groups, zero advantages), and both trainers do the same
    full-length work every step."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from shapeflow.runtime.builtin_tiny import CHARS, SPECIALS

    if (folder / "config.json").is_file():
        return folder
    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    vocab.update({f"<f{i}>": i for i in range(len(vocab), QWEN25_05B["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    config = Qwen2Config(**QWEN25_05B, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# shapeflow
# --------------------------------------------------------------------------------------------


def run_shapeflow(program, plan, warmup: int, steps: int, profile: int = 0, device: str = "cpu") -> dict:
    import torch

    from shapeflow.runtime.trainer import Trainer
    from shapeflow.stdlib.registry import default_registry

    config = program.config["train"]
    t_setup = time.perf_counter()
    trainer = Trainer(program, plan, default_registry(), config, device=device)
    trainer.setup()
    setup_s = time.perf_counter() - t_setup
    engine = trainer.engine("generate", trainer.policy)  # the instance the rollout stage will use
    generate = engine.generate = Timed(engine.generate)
    rows, profiler = [], None
    last_start = None
    for step in range(warmup + steps):
        if profile and step == warmup:
            profiler = cProfile.Profile()
            profiler.enable()
        start = time.perf_counter()
        m = trainer.train_step(step)
        cycle = start - last_start if last_start is not None else float("nan")
        last_start = start
        rows.append({
            "step": step,
            "step_s": m["perf/step_seconds"],
            "rollout_s": m["perf/rollout_seconds"],
            "update_s": m["perf/update_seconds"],
            "generate_s": generate.take(),
            "cycle_s": cycle,
            "response_length": m.get("rollout/response_length/mean"),
            "reward": m.get("reward/r/mean"),
        })
    if profiler is not None:
        profiler.disable()
    del engine.generate
    out = {"setup_s": setup_s, "rows": rows[warmup:], "threads": torch.get_num_threads(),
           "precision": str(trainer.accelerator.mixed_precision)}
    del trainer, engine
    free_accelerator_memory()
    if profiler is not None:
        out["profile"] = profiler
    return out


# --------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------


def trl_prompts(settings: dict, total_steps: int) -> list[dict]:
    """The prompts shapeflow's sampler draws for steps 0..total_steps-1, in order, so that TRL
    (shuffle off, 16 prompts a step) trains on exactly the same prompts at the same steps."""
    from shapeflow.runtime.sampler import PromptSampler
    from shapeflow.stdlib.tasks import arithmetic

    train = arithmetic(**settings["data"])
    sampler = PromptSampler(len(train), settings["seed"])
    out = []
    for _ in range(total_steps):
        for i in sampler.next(settings["prompts_per_step"]):
            e = train[i]
            out.append({"prompt": e.prompt, "answer": e.answer})
    return out


def run_trl(folder: Path, settings: dict, warmup: int, steps: int, out_dir: Path, device: str = "cpu") -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    total = warmup + steps
    try:
        dataset = Dataset.from_list(trl_prompts(settings, total))
    except pickle.PicklingError:
        # some datasets/dill/pyarrow combinations cannot hash an Arrow table for the cache
        # fingerprint (seen: Python 3.12, pyarrow 25, "Can't pickle <class 'MonthDayNano'>"); the
        # fingerprint only names cache files, so a random one changes nothing measured here
        import uuid

        import datasets.arrow_dataset

        datasets.arrow_dataset.generate_fingerprint = lambda _dataset: uuid.uuid4().hex
        print("note: datasets could not fingerprint the prompt table; using random fingerprints", file=sys.stderr)
        dataset = Dataset.from_list(trl_prompts(settings, total))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    # TRL tokenizes plain-text prompts with the tokenizer's defaults, which put <bos> first, as shapeflow does
    if tokenizer(dataset[0]["prompt"])["input_ids"][0] != tokenizer.bos_token_id:
        raise SystemExit("the tokenizer does not add <bos>: TRL and shapeflow would see different prompts")
    group = settings["group_size"]
    import dataclasses

    # GRPOConfig turns checkpointing on by default; shapeflow does not checkpoint (the field is
    # `activation_checkpointing` from transformers 5.2x, `gradient_checkpointing` before)
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_checkpointing = {k: False for k in ("activation_checkpointing", "gradient_checkpointing") if k in fields}
    args = GRPOConfig(
        **no_checkpointing,
        output_dir=str(out_dir),
        use_cpu=device == "cpu",
        bf16=device == "cuda",  # as shapeflow's mixed_precision = "auto": bf16 autocast on CUDA, fp32 weights
        fp16=False,
        seed=settings["seed"],
        max_steps=total,
        per_device_train_batch_size=settings["prompts_per_step"] * group,  # completions, not prompts
        gradient_accumulation_steps=1,
        num_generations=group,
        num_iterations=1,
        shuffle_dataset=False,  # the dataset already holds shapeflow's order
        max_completion_length=settings["max_new_tokens"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=settings["top_k"],
        learning_rate=settings["lr"],
        lr_scheduler_type=settings["lr_schedule"],
        warmup_steps=settings["warmup_steps"],
        weight_decay=settings["weight_decay"],
        adam_beta1=settings["betas"][0],
        adam_beta2=settings["betas"][1],
        max_grad_norm=settings["max_grad_norm"] or 0.0,
        optim="adamw_torch_fused",
        loss_type="dapo",  # token-mean over the whole batch, as the spec's agg = "token-mean"
        epsilon=settings["eps_low"],
        epsilon_high=settings["eps_high"],
        beta=settings["kl_coef"],  # > 0: TRL loads a reference model and adds beta * k3 per token
        scale_rewards="group",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )

    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start = None
            self.last_start = None

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()
            rows.append({"step": state.global_step,
                         "cycle_s": self.start - self.last_start if self.last_start is not None else float("nan")})
            self.last_start = self.start

        def on_step_end(self, args, state, control, **kw):
            rows[-1]["step_s"] = time.perf_counter() - self.start
            rows[-1]["rollout_s"] = rollout.take()
            rows[-1]["generate_s"] = generate.take()
            rows[-1]["update_s"] = rows[-1]["step_s"] - rows[-1]["rollout_s"]

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and rows and "reward" in logs:
                rows[-1]["reward"] = logs.get("reward")
                rows[-1]["response_length"] = logs.get("completions/mean_length")

    t_setup = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match_rewards, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepTimer()])
    setup_s = time.perf_counter() - t_setup
    trainer.remove_callback(PrinterCallback)  # it prints every step's logs (disable_tqdm=True puts it there)
    rollout = trainer._generate_and_score_completions = Timed(trainer._generate_and_score_completions)
    generate = model.generate = Timed(model.generate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    del model.generate
    if len(rows) != total:
        raise SystemExit(f"TRL ran {len(rows)} steps; expected {total}")
    ref_model = trainer.ref_model is not None
    checkpointing = bool(model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                         else getattr(model, "is_gradient_checkpointing", False))
    del trainer, model
    free_accelerator_memory()
    return {"setup_s": setup_s, "rows": rows[warmup:], "threads": torch.get_num_threads(),
            "ref_model": ref_model,
            "checkpointing": checkpointing}


# --------------------------------------------------------------------------------------------
# `shapeflow run` itself, as a subprocess (a cross-check of the in-process numbers)
# --------------------------------------------------------------------------------------------


def run_cli(spec: str, warmup: int, steps: int, out_dir: Path, threads: int, sets: list[str] = (),
            device: str = "cpu") -> dict:
    """`shapeflow run SPEC --steps W+N --device cpu` in a fresh process; per-step times from its
    metrics.jsonl: `perf/*` as the trainer measured them, and the cycle from the rows' `time`
    stamps (which adds the tracker's logging of each step)."""
    import subprocess

    exe = Path(sys.executable).with_name("shapeflow")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "shapeflow.cli"]
    cmd += ["run", str(Path(spec).resolve()), "--steps", str(warmup + steps), "--device", device,
            "--out", str(out_dir / "run")]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = (out_dir / "run" / "metrics.jsonl").read_text().splitlines()
    steps_rows = [r for r in map(json.loads, lines) if r.get("step", -1) >= 0 and "perf/step_seconds" in r]
    rows, prev = [], None
    for r in steps_rows:
        rows.append({
            "step": r["step"], "step_s": r["perf/step_seconds"], "rollout_s": r["perf/rollout_seconds"],
            "update_s": r["perf/update_seconds"], "generate_s": float("nan"),
            "cycle_s": r["time"] - prev if prev is not None else float("nan"),
            "response_length": r.get("rollout/response_length/mean"), "reward": r.get("reward/r/mean"),
        })
        prev = r["time"]
    return {"rows": rows[warmup:], "wall_s": wall,
            "command": f"shapeflow run {Path(spec).name} --steps {warmup + steps} --device {device}"}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

FIELDS = ("step_s", "generate_s", "rollout_s", "update_s", "cycle_s")


def summarise(rows: list[dict], responses_per_step: int) -> dict:
    out = {f: median([r[f] for r in rows if r.get(f) == r.get(f) and r.get(f) is not None]) for f in FIELDS}
    out["rollout_other_s"] = median([r["rollout_s"] - r["generate_s"] for r in rows
                                     if r["generate_s"] == r["generate_s"]])
    out["response_length"] = median([r["response_length"] for r in rows if r.get("response_length") is not None])
    out["reward"] = statistics.fmean([r["reward"] for r in rows if r.get("reward") is not None] or [float("nan")])
    out["steps"] = len(rows)
    # generated tokens per second of step time: responses x mean response length / median step
    out["tokens_per_s"] = responses_per_step * out["response_length"] / out["step_s"]
    return out


def print_profile(profiler, top: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    print(stream.getvalue())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "grpo.shape"),
                    help="the shapeflow spec (default specs/grpo.shape)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per run (default 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per run before the timed ones (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each runs both (default 2: SF TRL, TRL SF)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's default)")
    ap.add_argument("--profile", type=int, metavar="TOP", default=0,
                    help="after the rounds, one more shapeflow run under cProfile; print the TOP functions")
    ap.add_argument("--no-cli", action="store_true",
                    help="skip the cross-check run of `shapeflow run SPEC` as a subprocess")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--target", type=float, default=1.5, help="the wanted ratio TRL / shapeflow (default 1.5)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where both train (cuda: bf16 autocast for both, fp32 weights)")
    ap.add_argument("--model", choices=("spec", "random-qwen2-0.5b"), default="spec",
                    help="the spec's model (default), or a random-init Qwen2 of Qwen2.5-0.5B's shape")
    ap.add_argument("--max-new-tokens", type=int, help="override the rollout's max_new_tokens")
    ap.add_argument("--prompts-per-step", type=int, help="override train.prompts_per_step")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from shapeflow.runtime.models import builtin_folder

    tmp_root = Path(tempfile.mkdtemp(prefix="shapeflow-vs-trl-"))
    atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    sets = []
    if args.model == "random-qwen2-0.5b":
        print("building the random-init Qwen2 (Qwen2.5-0.5B shape)", file=sys.stderr, flush=True)
        sets.append(f"policy.path={random_qwen2_folder(tmp_root / 'qwen2-0.5b-random')}")
    if args.max_new_tokens:
        sets.append(f"groups.max_new_tokens={args.max_new_tokens}")
    if args.prompts_per_step:
        sets.append(f"train.prompts_per_step={args.prompts_per_step}")
    program, plan = load_spec(Path(args.spec), args.warmup + args.steps, sets)
    settings = spec_settings(program)
    model_path = settings["model"]
    folder = builtin_folder(model_path.removeprefix("builtin:")) if model_path.startswith("builtin:") \
        else Path(model_path)
    responses_per_step = settings["prompts_per_step"] * settings["group_size"]

    import transformers

    try:
        import trl
    except ImportError:
        raise SystemExit('TRL is not installed: .venv/bin/pip install trl "torch==2.13.0"') from None

    results = {"shapeflow": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="runs-", dir=tmp_root) as tmp:
        for r in range(args.rounds):
            order = ("shapeflow", "trl") if r % 2 == 0 else ("trl", "shapeflow")
            for name in order:
                print(f"round {r + 1}/{args.rounds}: {name} ({args.warmup} warm-up + {args.steps} timed steps)",
                      file=sys.stderr, flush=True)
                if name == "shapeflow":
                    res = run_shapeflow(program, plan, args.warmup, args.steps, device=args.device)
                else:
                    with contextlib.redirect_stdout(sys.stderr):
                        res = run_trl(folder, settings, args.warmup, args.steps, Path(tmp) / f"trl-{r}",
                                      device=args.device)
                if torch.get_num_threads() != threads:
                    raise SystemExit(f"{name} changed the torch thread count to {torch.get_num_threads()}")
                res["round"] = r + 1
                results[name].append(res)
        cli = None
        if not args.no_cli:
            print("cross-check: shapeflow run as a subprocess", file=sys.stderr, flush=True)
            cli_dir = Path(tmp) / "cli"
            cli_dir.mkdir()
            cli = run_cli(args.spec, args.warmup, args.steps, cli_dir, threads, sets, args.device)
        profile = None
        if args.profile:
            print("profiling shapeflow", file=sys.stderr, flush=True)
            profile = run_shapeflow(program, plan, args.warmup, args.steps, profile=args.profile,
                                    device=args.device)

    summary = {
        name: {
            **summarise([row for res in runs for row in res["rows"]], responses_per_step),
            "per_round_step_s": [median([row["step_s"] for row in res["rows"]]) for res in runs],
            "setup_s": [res["setup_s"] for res in runs],
        }
        for name, runs in results.items()
    }
    if cli is not None:
        summary["shapeflow run (CLI)"] = {**summarise(cli["rows"], responses_per_step), "per_round_step_s": [], "setup_s": [],
                                          "command": cli["command"]}
    ratio = summary["trl"]["step_s"] / summary["shapeflow"]["step_s"]
    ratio_cycle = summary["trl"]["cycle_s"] / summary["shapeflow"]["cycle_s"]
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        "device": args.device,
        "model": model_path if args.model == "spec" else "random-init Qwen2, Qwen2.5-0.5B shape (494M parameters)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "spec": str(Path(args.spec).resolve().relative_to(ROOT)) if Path(args.spec).resolve().is_relative_to(ROOT)
        else args.spec,
        "warmup": args.warmup,
        "steps": args.steps,
        "rounds": args.rounds,
        "settings": settings,
        "trl_ref_model": all(res["ref_model"] for res in results["trl"]),
        "trl_checkpointing": any(res["checkpointing"] for res in results["trl"]),
    }
    if args.json:
        def strict(x):  # NaN (a split a run does not measure) as null: strict JSON
            if isinstance(x, dict):
                return {k: strict(v) for k, v in x.items()}
            if isinstance(x, list):
                return [strict(v) for v in x]
            return None if isinstance(x, float) and x != x else x

        print(json.dumps(strict({"meta": meta, "summary": summary, "ratio_step": ratio, "ratio_cycle": ratio_cycle}),
                         indent=2))
    else:
        print(f"{meta['date']}  {meta['machine']}  torch {meta['torch']}  transformers {meta['transformers']}  "
              f"trl {meta['trl']}")
        print(f"model: {meta['model']}; device {args.device}")
        print(f"{meta['spec']}: {settings['prompts_per_step']} prompts x {settings['group_size']}, "
              f"max_new_tokens {settings['max_new_tokens']}; {args.rounds} rounds x {args.steps} timed steps "
              f"(after {args.warmup} warm-up) each; medians in ms")
        print()
        print("| | step | generate | rest of rollout | update | cycle | per-round step | resp. len | reward | tokens/s |")
        print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|")
        def ms(x):
            return "-" if x != x else f"{1e3 * x:.1f}"

        for name, s in summary.items():
            per_round = " / ".join(ms(x) for x in s["per_round_step_s"]) or "-"
            generate = ms(s["generate_s"])
            rest = ms(s["rollout_s"]) + " (all)" if generate == "-" else ms(s["rollout_other_s"])
            print(f"| {name} | {ms(s['step_s'])} | {generate} | "
                  f"{rest} | {ms(s['update_s'])} | {ms(s['cycle_s'])} | "
                  f"{per_round} | {s['response_length']:.2f} | {s['reward']:.3f} | {s['tokens_per_s']:.0f} |")
        print()
        verdict = "meets" if ratio >= args.target else "misses"
        print(f"ratio TRL / shapeflow, median step: {ratio:.2f}x ({verdict} the target {args.target}x); "
              f"median cycle: {ratio_cycle:.2f}x")
        if cli is not None:
            print(f"(the CLI row is one `{cli['command']}` process after the rounds, "
                  f"{cli['wall_s']:.1f} s in all; its cycle includes the tracker)")
        if meta["trl_checkpointing"] or not meta["trl_ref_model"]:
            print("WARNING: TRL ran with gradient checkpointing or without a reference model", file=sys.stderr)
    if profile is not None:
        print(f"\ncProfile of shapeflow's {args.steps} timed steps (after {args.warmup} warm-up):", flush=True)
        print_profile(profile["profile"], args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
