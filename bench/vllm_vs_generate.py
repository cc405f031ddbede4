#!/usr/bin/env python3
"""Rollout throughput of the vLLM engine against the generate engine, side by side, on the CPU.

Both engines are the ones a run uses (`shapeflow.runtime.engine.GenerateEngine`,
`shapeflow.runtime.vllm_engine.VllmEngine`), built from the same policy in one process, and
are given the same prompts, group size, length limit and sampling settings. Per workload,
after a warm-up call of each, the engines alternate (A B, B A, ...) so that drift on a shared
machine hits both alike; each call is timed with time.perf_counter and its response tokens
(EOS included) counted. Reported: median seconds per batch, median response tokens per
second, and their ratio vLLM / generate (> 1: vLLM is faster). The vLLM engine also pays a
weight push after every optimizer step, timed separately, and once its start-up.

Workloads:
    rl-tiny     builtin:arith-tiny (0.5 M params, warmed up), 16 prompts x 8, <= 5 tokens:
                specs/grpo.shape's rollout (answers end after ~3 tokens)
    rl-tiny-lp  the same, recording rollout_logprobs (what mismatch.tis needs)
    mid-64      a random-init Qwen2 (hidden 384, 6 layers, 6 heads of 64: 11 M params, char
                vocab), 16 x 8, <= 64 tokens (random weights rarely emit EOS: mostly full length)
    mid-128     the same model, 16 x 8, <= 128 tokens

    .venv-vllm/bin/python bench/vllm_vs_generate.py              # all workloads, 5 rounds
    .venv-vllm/bin/python bench/vllm_vs_generate.py --rounds 9 --json out.json
    .venv-vllm/bin/python bench/vllm_vs_generate.py --only rl-tiny,mid-64 --threads 1

Needs the vLLM environment (`make vllm`); `make bench-vllm` runs it. See bench/README-vllm.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Workload:
    name: str
    model: str  # "tiny" or "mid"
    prompts: int
    n: int
    max_new_tokens: int
    temperature: float = 1.0
    logprobs: bool = False


WORKLOADS = [
    Workload("rl-tiny", "tiny", 16, 8, 5),
    Workload("rl-tiny-lp", "tiny", 16, 8, 5, logprobs=True),
    Workload("mid-64", "mid", 16, 8, 64),
    Workload("mid-128", "mid", 16, 8, 128),
]


def mid_model(folder: Path):
    """A random-init Qwen2 with the builtin character tokenizer, saved and loaded as a policy."""
    from shapeflow.runtime.builtin_tiny import char_tokenizer, tiny_qwen2
    from shapeflow.runtime.models import load_policy

    tokenizer = char_tokenizer()
    model = tiny_qwen2(len(tokenizer), hidden=384, layers=6, heads=6, seed=0)
    model.config.max_position_embeddings = 512
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_policy(str(folder), dtype="float32")


def timed(engine, examples, w: Workload, seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    batch = engine.generate(examples, n=w.n, max_new_tokens=w.max_new_tokens, temperature=w.temperature, top_p=1.0,
                            top_k=0, logprobs=w.logprobs, seeds=[seed * 1000 + i for i in range(len(examples))])
    return time.perf_counter() - start, int(batch.mask.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each engine per workload (default 5)")
    parser.add_argument("--only", help="comma-separated workload names")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for both engines (default: torch's, "
                        "one per core); 1 is steadier on a machine shared with other work")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the vLLM engine restores torch.set_num_threads after its start

    from shapeflow.runtime.engine import GenerateEngine
    from shapeflow.runtime.models import load_policy
    from shapeflow.runtime.vllm_engine import VllmEngine
    from shapeflow.stdlib.tasks import arithmetic

    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only.split(",")]
    data = arithmetic(digits=2, second_digits=1, split="train", test_fraction=0.1, size=None, seed=0).examples
    policies, engines, startup, pushes = {}, {}, {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="shapeflow-bench-")
    for kind in sorted({w.model for w in chosen}, reverse=True):  # tiny first
        policy = load_policy("builtin:arith-tiny") if kind == "tiny" else mid_model(Path(tmp.name) / "mid")
        start = time.perf_counter()
        vllm_engine = VllmEngine(policy, "cpu")
        startup[kind] = time.perf_counter() - start
        times = []
        for _ in range(11):
            t = time.perf_counter()
            vllm_engine.weights_updated(policy.model)
            times.append(time.perf_counter() - t)
        pushes[kind] = statistics.median(times)
        policies[kind] = policy
        engines[kind] = {"generate": GenerateEngine(policy, "cpu"), "vllm": vllm_engine}
    results = []
    for w in chosen:
        examples = data[:w.prompts]
        runs = {"generate": [], "vllm": []}
        for name, engine in engines[w.model].items():  # warm-up
            timed(engine, examples, w, seed=99)
        for r in range(args.rounds):
            order = ["generate", "vllm"] if r % 2 == 0 else ["vllm", "generate"]
            for name in order:
                runs[name].append(timed(engines[w.model][name], examples, w, seed=r))
        row = {"workload": w.name, "model": w.model, "prompts": w.prompts, "n": w.n,
               "max_new_tokens": w.max_new_tokens, "temperature": w.temperature, "logprobs": w.logprobs}
        for name, values in runs.items():
            row[f"{name}_s"] = statistics.median(t for t, _ in values)
            row[f"{name}_tok_s"] = statistics.median(k / t for t, k in values)
            row[f"{name}_tokens"] = statistics.median(k for _, k in values)
        row["ratio"] = row["vllm_tok_s"] / row["generate_tok_s"]
        row["vllm_push_s"] = pushes[w.model]
        results.append(row)
        print(f"{w.name}: generate {row['generate_s'] * 1000:.0f} ms ({row['generate_tok_s']:.0f} tok/s), "
              f"vllm {row['vllm_s'] * 1000:.0f} ms ({row['vllm_tok_s']:.0f} tok/s), ratio {row['ratio']:.2f}",
              file=sys.stderr, flush=True)

    params = {k: sum(p.numel() for p in pol.model.parameters()) for k, pol in policies.items()}
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    import transformers
    import vllm

    print(f"\n{time.strftime('%Y-%m-%d')}  {machine}, vllm {vllm.__version__}, transformers {transformers.__version__}; "
          f"median of {args.rounds} alternating rounds")
    print("vLLM start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
          + "; weight push: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in pushes.items())
          + "; params: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items()))
    print("\n| workload | prompts × n, max tokens | tokens/batch | generate ms | vLLM ms | generate tok/s | "
          "vLLM tok/s | ratio vLLM/generate | vLLM incl. push ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        with_push = r["vllm_tokens"] / (r["vllm_s"] + r["vllm_push_s"]) / r["generate_tok_s"]
        print(f"| {r['workload']} | {r['prompts']} × {r['n']}, {r['max_new_tokens']}"
              f"{' (T=%g)' % r['temperature'] if r['temperature'] != 1 else ''}{', logprobs' if r['logprobs'] else ''} "
              f"| {r['generate_tokens']:.0f} / {r['vllm_tokens']:.0f} | {r['generate_s'] * 1000:.0f} | "
              f"{r['vllm_s'] * 1000:.0f} | {r['generate_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
              f"**{r['ratio']:.2f}** | {with_push:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "startup_s": startup, "push_s": pushes,
                                               "params": params, "rounds": args.rounds, "results": results},
                                              indent=2))
    for engine_pair in engines.values():
        engine_pair["vllm"].close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
