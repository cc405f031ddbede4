#!/usr/bin/env python3
"""Peak memory and time of the update's log-prob pass: shapeflow's chunked reduction against
autograd on the plain expression, on a random-init Qwen2 with a real-size vocabulary.

Both variants run the same model forward (the prompt once per group, its cache repeated), then
turn the logits into the sampled tokens' log-probs at temperature τ and backpropagate a
weighted sum of them, as the update phase does:

    plain     autograd on log_softmax(z/τ)[y] over the concatenated (B, T, V) logits
              (what token_logprobs did before: a cat copy, a float32 copy, the division,
              logsumexp keeping its float32 input for the backward)
    chunked   shapeflow.runtime.engine.token_logprobs as it is: the logits in two parts, reduced
              a few rows at a time, the softmax recomputed chunk by chunk in the backward

with and without the entropy statistic the update computes on its first epoch. Each variant runs
in a fresh process (peak resident memory, `ru_maxrss`, is per process), the variants alternate
over --rounds, and the script prints the median peak memory above the process's size after the
model was built, and the median time of forward + backward; the log-probs and gradients of the
two are compared first (max abs difference).

    .venv/bin/python bench/logprob_pass.py                       # vocab 32768, 16 x 128 tokens
    .venv/bin/python bench/logprob_pass.py --vocab 151936 --responses 8 --tokens 64
    python3 bench/logprob_pass.py --device cuda --vocab 151936 --responses 16 --tokens 512   # GPU

On CUDA the forward runs under bf16 autocast (as the trainer's mixed precision "auto" does) and
the peak is torch.cuda.max_memory_allocated above the memory after the model was built.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def build(vocab: int, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float().train()


def batch(vocab: int, responses: int, tokens: int, group: int = 4, prompt: int = 16, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (responses // group, prompt), generator=g).repeat_interleave(group, 0)
    ids = torch.randint(0, vocab, (responses, tokens), generator=g)
    mask = torch.ones(responses, tokens)
    mask[:, tokens // 2:] = (torch.rand(responses, tokens - tokens // 2, generator=g) > 0.3).float().cumprod(-1)
    weights = torch.randn(responses, tokens, generator=g)
    return prompts, torch.ones_like(prompts), ids, mask, weights


def plain_logprobs(model, prompt_tokens, prompt_mask, response_ids, response_mask, *, temperature, entropy):
    """The previous implementation's arithmetic after the same two forwards."""
    import torch

    from shapeflow.runtime.engine import new_cache, unique_prompts, with_cache

    P = prompt_tokens.shape[1]
    attention = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    first, inverse = unique_prompts(prompt_tokens)
    cache = new_cache(model)
    prefix = model(input_ids=prompt_tokens[first], attention_mask=prompt_mask[first], position_ids=positions[first, :P],
                   use_cache=True, **with_cache(model, cache))
    cache.reorder_cache(inverse)
    out = model(input_ids=response_ids, attention_mask=attention, position_ids=positions[:, P:], use_cache=True,
                **with_cache(model, cache))
    raw = torch.cat([prefix.logits[inverse, -1:, :], out.logits[:, :-1, :]], dim=1)
    logits = raw.float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    chosen = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    mask = response_mask.to(logits.dtype)
    ent = None
    if entropy:
        with torch.no_grad():
            d = logits.detach()
            ent = (logz.detach() - (torch.softmax(d, dim=-1) * d).sum(-1)) * mask
    return (chosen - logz) * mask, ent


def one(variant: str, vocab: int, responses: int, tokens: int, entropy: bool, repeat: int,
        device: str = "cpu") -> dict:
    """Run in a fresh process: build, then forward + backward ``repeat`` times."""
    import contextlib

    import torch

    from shapeflow.runtime.engine import token_logprobs

    cuda = device == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    model = build(vocab).to(device)
    inputs = [x.to(device) for x in batch(vocab, responses, tokens)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeat):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast:
            if variant == "plain":
                lp, _ = plain_logprobs(model, *inputs[:4], temperature=0.7, entropy=entropy)
            else:
                lp = token_logprobs(model, *inputs[:4], temperature=0.7, entropy=entropy).logprobs
        (lp * inputs[4]).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "entropy": entropy, "extra_peak_mb": (peak - before) / 2**20,
            "seconds": statistics.median(times)}


def agreement(vocab: int, responses: int, tokens: int, device: str = "cpu") -> dict:
    from shapeflow.runtime.engine import token_logprobs

    model = build(vocab).to(device)
    inputs = [x.to(device) for x in batch(vocab, responses, tokens)]
    lp_a, _ = plain_logprobs(model, *inputs[:4], temperature=0.7, entropy=False)
    (lp_a * inputs[4]).sum().backward()
    grads_a = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    lp_b = token_logprobs(model, *inputs[:4], temperature=0.7).logprobs
    (lp_b * inputs[4]).sum().backward()
    grads_b = [p.grad for p in model.parameters()]
    return {"logprobs_max_abs_diff": float((lp_a - lp_b).abs().max().detach()),
            "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(grads_a, grads_b)),
            "grad_max_abs": max(float(a.abs().max()) for a in grads_a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="forward + backward passes per process")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("VARIANT", "ENTROPY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.vocab, args.responses, args.tokens, args.one[1] == "1", args.repeat,
                             args.device)))
        return
    results: dict[tuple[str, bool], list[dict]] = {}
    for r in range(args.rounds):
        order = [("plain", False), ("chunked", False), ("plain", True), ("chunked", True)]
        for variant, entropy in order if r % 2 == 0 else order[::-1]:
            cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--responses", str(args.responses),
                   "--tokens", str(args.tokens), "--repeat", str(args.repeat), "--device", args.device,
                   "--one", variant, str(int(entropy))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.setdefault((variant, entropy), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    # after the measurements: a child's peak resident memory starts from its parent's at the fork
    agree = agreement(args.vocab, args.responses, args.tokens, args.device)
    rows = []
    for (variant, entropy), runs in results.items():
        rows.append({"variant": variant, "entropy": entropy,
                     "extra_peak_mb": statistics.median(r["extra_peak_mb"] for r in runs),
                     "seconds": statistics.median(r["seconds"] for r in runs)})
    if args.json:
        print(json.dumps({"agreement": agree, "rows": rows, "args": vars(args)}, indent=2))
        return
    B, T, V = args.responses, args.tokens, args.vocab
    print(f"random Qwen2 (h64, 2 layers) on {args.device}, vocab {V}, {B} responses x {T} tokens; one (B, T, V) "
          f"float32 copy = {B * T * V * 4 / 2**20:.0f} MB; {args.rounds} rounds x {args.repeat} passes"
          + (", 1 thread" if args.device == "cpu" else ", bf16 autocast"))
    print(f"agreement: log-probs {agree['logprobs_max_abs_diff']:.2e}, gradients {agree['grad_max_abs_diff']:.2e} "
          f"(largest gradient {agree['grad_max_abs']:.2e})")
    print("| variant | entropy statistic | peak memory above the model (MB) | forward + backward (s) |")
    print("|---|---|---:|---:|")
    for row in sorted(rows, key=lambda r: (r["entropy"], r["variant"] != "plain")):
        print(f"| {row['variant']} | {'yes' if row['entropy'] else 'no'} | {row['extra_peak_mb']:.0f} | "
              f"{row['seconds']:.3f} |")
    for entropy in (False, True):
        a = next(r for r in rows if r["variant"] == "plain" and r["entropy"] == entropy)
        b = next(r for r in rows if r["variant"] == "chunked" and r["entropy"] == entropy)
        print(f"entropy {'on ' if entropy else 'off'}: chunked / plain memory {b['extra_peak_mb'] / a['extra_peak_mb']:.2f}, "
              f"time {b['seconds'] / a['seconds']:.2f}")


if __name__ == "__main__":
    main()
