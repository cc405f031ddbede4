"""Rollout engines and the one function that turns a policy's logits into token log-probs.

`token_logprobs` is used by the rollout phase (behaviour log-probs, entropy, hidden states,
reference log-probs) and by the update phase (current-policy log-probs), with the same
temperature handling and, for the first minibatch, the same row sets and shapes, so the
importance ratio starts at exactly 1.

Engines only sample tokens. Each is registered under the name a spec gives to
``rollouts.sample(engine = ...)``; `shapeflow.stdlib.rollouts` declares what each provides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from shapeflow._lazy import torch
from shapeflow.runtime.batch import RolloutBatch, group_index_of

if TYPE_CHECKING:
    from torch import Tensor

    from shapeflow.runtime.models import Policy


@dataclass
class TokenStats:
    logprobs: "Tensor"  # (B, T) log-prob of each response token, zero on padding
    entropy: "Tensor | None" = None  # (B, T) full-vocabulary entropy
    hidden: "Tensor | None" = None  # (B, T, H) last-layer hidden state
    extra: dict = field(default_factory=dict)  # the token needs asked for by name (see TOKEN_NEEDS)
    values: "Tensor | None" = None  # (B, T) a value head's V(s_t), zero on padding


TOKEN_NEEDS = ("self_certainty", "sampled_logit", "sum_pi_squared")  # and "logprobs@T": full-logit reductions


def token_needs(needs) -> frozenset[str]:
    """The needs among ``needs`` that the behaviour pass computes from the full logits."""
    return frozenset(n for n in needs if n in TOKEN_NEEDS or n.startswith("logprobs@"))


def new_cache(model):
    """An empty key/value cache for ``model``, filled in place by each forward it is given to."""
    from transformers import DynamicCache

    return DynamicCache(config=getattr(model, "module", model).config)  # a DDP wrapper holds the model


def with_cache(model, cache) -> dict[str, Any]:
    """The keyword a model's forward takes its cache by: `cache` (transformers 5.2x) or
    `past_key_values` (earlier releases)."""
    return {_cache_keyword(type(getattr(model, "module", model))): cache}  # a DDP wrapper's module


@lru_cache(maxsize=None)
def _cache_keyword(model_type: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def unique_prompts(prompt_tokens: "Tensor") -> tuple["Tensor", "Tensor"]:
    """(U,) a row holding each distinct prompt, and (B,) the index of each row's prompt."""
    _, inverse = torch.unique(prompt_tokens, dim=0, return_inverse=True)
    first = torch.zeros(int(inverse.max()) + 1, dtype=torch.long, device=inverse.device)
    first.scatter_(0, inverse, torch.arange(len(inverse), device=inverse.device))
    return first, inverse


def token_logprobs(
    model,
    prompt_tokens: "Tensor",
    prompt_mask: "Tensor",
    response_ids: "Tensor",
    response_mask: "Tensor",
    *,
    temperature: float,
    entropy: bool = False,
    hidden: bool = False,
    entropy_grad: bool = False,
    extras: frozenset[str] = frozenset(),
    value_head=None,
) -> TokenStats:
    """Log π(y_t | x, y_<t) of each response token under ``model`` at ``temperature``.

    ``entropy`` adds the full-vocabulary token entropy, as a statistic (no gradient) unless
    ``entropy_grad`` asks for it to be differentiable (an entropy bonus in the loss).
    ``extras`` names further per-token reductions of the logits (``token_needs``), computed
    only when asked for: ``sampled_logit`` (the raw logit of the sampled token, before the
    temperature), ``self_certainty`` (logsumexp(z/τ) − mean(z/τ), at every position, padding
    included, as verl computes it for UCAS), ``sum_pi_squared`` (Σ_v π_v² at τ) and ``logprobs@T`` (log softmax(z/T) of the
    sampled token at another temperature T). ``value_head`` (a module on the last hidden state)
    adds the values V(s_t) of the state each response token is chosen in, from the same forward.

    Shapes: prompt (B, P) left-padded, response (B, T) right-padded. Position ids follow the
    attention mask, as `generate` assigns them. The responses of one prompt share it: each
    distinct prompt is run once and its key/value cache is repeated for its responses (with a
    group of 8, most of the prompt compute disappears); gradients flow through the shared
    prompt as through separate copies. The computation depends only on the rows given, so
    the rollout and the update get identical values for the same rows.
    """
    P = prompt_tokens.shape[1]
    attention = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)  # (B, P+T)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    first, inverse = unique_prompts(prompt_tokens)
    cache = new_cache(model)
    want_states = value_head is not None
    prefix = model(input_ids=prompt_tokens[first], attention_mask=prompt_mask[first],
                   position_ids=positions[first, :P], use_cache=True, output_hidden_states=want_states,
                   **with_cache(model, cache))
    cache.reorder_cache(inverse)  # (U, ...) -> (B, ...): each response reads its prompt's keys/values
    out = model(input_ids=response_ids, attention_mask=attention, position_ids=positions[:, P:],
                use_cache=True, output_hidden_states=hidden or want_states, **with_cache(model, cache))
    mask = response_mask.to(torch.float32)
    # The logits of each response token: the prompt's last position, then the response's own
    # positions but its last. Kept in two parts (no (B, T, V) concatenated copy), reduced in
    # chunks of rows so that no full-size float32 copy of the logits is made or kept for backward.
    parts = ((prefix.logits[inverse, -1:, :], response_ids[:, :1]), (out.logits[:, :-1, :], response_ids[:, 1:]))
    if entropy_grad:  # a loss term on the entropy itself: plain autograd over the whole tensor
        raw = torch.cat([parts[0][0], parts[1][0]], dim=1)  # (B, T, V)
        logits = raw.float() / temperature
        logz = torch.logsumexp(logits, dim=-1)  # (B, T)
        chosen = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        stats = TokenStats(logprobs=(chosen - logz) * mask)
        stats.entropy = (logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)) * mask
    else:
        pieces = [_SampledLogprob.apply(z, ids, float(temperature)) for z, ids in parts]
        logz = torch.cat([lz for _, lz in pieces], dim=1)  # (B, T), no gradient
        stats = TokenStats(logprobs=torch.cat([lp for lp, _ in pieces], dim=1) * mask)
    wanted = set(extras) | ({"entropy"} if entropy and not entropy_grad else set())
    if wanted:
        with torch.no_grad():
            reduced = _reduce_logits(parts, logz.detach(), mask, temperature, frozenset(wanted))
        if "entropy" in wanted:
            stats.entropy = reduced.pop("entropy")
        stats.extra = reduced
    if hidden:
        stats.hidden = out.hidden_states[-1] * mask.unsqueeze(-1).to(out.hidden_states[-1].dtype)
    if want_states:
        states = torch.cat([prefix.hidden_states[-1][inverse, -1:], out.hidden_states[-1][:, :-1]], dim=1)
        stats.values = value_head(states.to(value_head.weight.dtype)).squeeze(-1).float() * mask
    return stats


# float32 elements a chunk of logits may take (16 MB): a (B, t, V) tensor is reduced a few rows,
# or a few positions of one row, at a time, so the temporaries stay small and cache-friendly
# whatever the vocabulary and the length (bench/logprob_pass.py)
CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, positions: int, vocab: int) -> list[tuple[slice, slice]]:
    """(rows, positions) slices covering a (rows, positions, vocab) tensor, each at most
    CHUNK_ELEMENTS elements (one position at least)."""
    per_row = positions * vocab
    if per_row <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // max(1, per_row))
        return [(slice(r, min(r + step, rows)), slice(0, positions)) for r in range(0, rows, step)]
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [(slice(r, r + 1), slice(c, min(c + step, positions))) for r in range(rows) for c in range(0, positions, step)]


class _SampledLogprob(torch.autograd.Function):
    """log softmax(z/τ)[y] (and logsumexp(z/τ), without gradient) for logits z (B, t, V) and
    tokens y (B, t), in float32, chunk by chunk over the rows.

    Autograd on the plain expression keeps a float32 copy of every logit for the backward of
    logsumexp (and makes more for the cast and the division); this keeps only the logits it was
    given (alive anyway, in the model's dtype) and logsumexp (B, t), and recomputes the softmax
    chunk by chunk in the backward: ∂/∂z_v = (1[v = y] − softmax(z/τ)_v) / τ."""

    @staticmethod
    def forward(ctx, logits, ids, temperature):
        B, t = ids.shape
        out = torch.empty(B, t, dtype=torch.float32, device=logits.device)
        logz = torch.empty(B, t, dtype=torch.float32, device=logits.device)
        for rows, cols in _chunks(B, t, logits.shape[-1]):
            z = logits[rows, cols].float() / temperature
            lz = torch.logsumexp(z, dim=-1)
            logz[rows, cols] = lz
            out[rows, cols] = z.gather(-1, ids[rows, cols].unsqueeze(-1)).squeeze(-1) - lz
        ctx.save_for_backward(logits, ids, logz)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(logz)
        return out, logz

    @staticmethod
    def backward(ctx, grad_out, _grad_logz):
        logits, ids, logz = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(logits)
        for rows, cols in _chunks(ids.shape[0], ids.shape[1], logits.shape[-1]):
            g = grad_out[rows, cols].float().unsqueeze(-1)  # (b, t, 1)
            p = torch.exp(logits[rows, cols].float() / temperature - logz[rows, cols].unsqueeze(-1))  # softmax
            p.mul_(-g).scatter_add_(-1, ids[rows, cols].unsqueeze(-1), g)
            grad[rows, cols] = (p / temperature).to(grad.dtype)
        return grad, None, None


def _reduce_logits(parts, logz, mask, temperature: float, wanted: frozenset[str]) -> dict:
    """Per-token reductions of the full logits (no gradient), chunk by chunk over the rows of
    each part: ``entropy`` and the needs of ``token_needs``. ``parts``: the (logits (B, t, V),
    tokens (B, t)) pieces that make up the T response positions, in order."""
    out: dict = {}
    start = 0
    for raw, ids in parts:
        B, t = ids.shape
        for rows, cols in _chunks(B, t, raw.shape[-1]):
            at = slice(start + cols.start, start + cols.stop)  # the positions among all T
            for name, value in _logit_reductions(raw[rows, cols], temperature, logz[rows, at], ids[rows, cols],
                                                 mask[rows, at], wanted).items():
                out.setdefault(name, torch.zeros(mask.shape, dtype=torch.float32, device=mask.device))[rows, at] = value
        start += t
    return out


def _logit_reductions(raw, temperature, logz, response_ids, mask, wanted) -> dict:
    """The reductions of ``wanted`` for one chunk: raw logits (b, t, V), logsumexp(z/τ) (b, t)."""
    out = {}
    logits = raw.float() / temperature
    ids = response_ids.unsqueeze(-1)
    if "entropy" in wanted:  # H = logsumexp(z) − Σ softmax(z)·z
        out["entropy"] = (logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)) * mask
    if "sampled_logit" in wanted:
        out["sampled_logit"] = raw.gather(-1, ids).squeeze(-1).float() * mask
    if "self_certainty" in wanted:  # unmasked on purpose: UCAS's code sums it over every position
        out["self_certainty"] = logz - logits.mean(-1)
    if "sum_pi_squared" in wanted:  # Σπ² = exp(logsumexp(2z) − 2·logsumexp(z)), z the tempered logits
        out["sum_pi_squared"] = torch.exp(torch.logsumexp(2 * logits, dim=-1) - 2 * logz) * mask
    for name in sorted(n for n in wanted if n.startswith("logprobs@")):
        scaled = raw.float() / float(name.partition("@")[2])
        out[name] = (scaled.gather(-1, ids).squeeze(-1) - torch.logsumexp(scaled, dim=-1)) * mask
    return out


def token_values(model, value_head, prompt_tokens: "Tensor", prompt_mask: "Tensor", response_ids: "Tensor",
                 response_mask: "Tensor") -> "Tensor":
    """(B, T) V(s_t) of a separate critic: ``value_head`` on the last hidden state of ``model``'s
    body (no language-model head), at the state before each response token, as the log-probs
    are aligned; each prompt runs once per group, as in ``token_logprobs``."""
    body = getattr(model, "module", model).base_model
    P = prompt_tokens.shape[1]
    attention = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    first, inverse = unique_prompts(prompt_tokens)
    cache = new_cache(model)
    prefix = body(input_ids=prompt_tokens[first], attention_mask=prompt_mask[first], position_ids=positions[first, :P],
                  use_cache=True, **with_cache(body, cache))
    cache.reorder_cache(inverse)
    out = body(input_ids=response_ids, attention_mask=attention, position_ids=positions[:, P:], use_cache=True,
               **with_cache(body, cache))
    states = torch.cat([prefix.last_hidden_state[inverse, -1:], out.last_hidden_state[:, :-1]], dim=1)
    return value_head(states.to(value_head.weight.dtype)).squeeze(-1).float() * response_mask.to(torch.float32)


def sample_next(logits: "Tensor", *, temperature: float, top_p: float, top_k: int, greedy: bool,
                generators: list | None = None) -> "Tensor":
    """One token per row from (B, V) logits: argmax, or a sample of softmax(logits / T) after
    top-k and top-p filtering (the same temperature the log-probs use). ``generators``: one
    random stream per block of B / len(generators) consecutive rows (a prompt's responses), so
    a prompt's samples do not depend on which other prompts share the batch."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    blocks = probs.split(probs.shape[0] // len(generators))
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(blocks, generators)]).squeeze(-1)


class GenerateEngine:
    """Sampling with Hugging Face `generate` on the training model itself."""

    def __init__(self, policy: "Policy", device):
        self.policy, self.device = policy, device

    def encode_prompts(self, prompts: list[str], chat: bool = False) -> tuple["Tensor", "Tensor"]:
        tok = self.policy.tokenizer
        tok.padding_side = "left"
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError("chat = true, but the tokenizer has no chat template")
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def generate(self, examples: list[Any], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, greedy: bool = False, chat: bool = False,
                 logprobs: bool = False, seeds: list[int] | None = None) -> RolloutBatch:
        """``n`` responses for each example; responses of one example are adjacent.

        A sampling loop with a key/value cache: each prompt is run once and its cache repeated
        for its ``n`` responses; decoding stops when every response has ended. ``logprobs``
        records ``extra["rollout_logprobs"]``: log softmax(z/T) of each sampled token as the
        sampler saw it (the update phase's convention: temperature, no top-k/top-p), the
        numbers a train/inference mismatch correction compares with the trainer's. ``seeds``
        (one per example) give each prompt its own random stream: its responses are then the
        same whichever other prompts, or process, share the batch."""
        policy = self.policy
        model = policy.model
        eos, pad = policy.eos_token_id, policy.pad_token_id
        unique_tokens, unique_mask = self.encode_prompts([e.prompt for e in examples], chat=chat)  # (E, P)
        repeat = torch.arange(len(examples), device=unique_tokens.device).repeat_interleave(n)  # (B,)
        prompt_tokens, prompt_mask = unique_tokens[repeat], unique_mask[repeat]
        was_training = model.training
        model.eval()
        positions = (unique_mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(model)
        kw = with_cache(model, cache)
        out = model(input_ids=unique_tokens, attention_mask=unique_mask, position_ids=positions, use_cache=True, **kw)
        cache.reorder_cache(repeat)
        logits = out.logits[repeat, -1, :]
        next_pos = positions[repeat, -1] + 1  # (B,)
        attention = prompt_mask
        B = len(repeat)
        done = torch.zeros(B, dtype=torch.bool, device=repeat.device)
        tokens, sampled_logprobs = [], []
        generators = None
        if seeds is not None and not greedy:
            generators = [torch.Generator(device=repeat.device).manual_seed(int(s)) for s in seeds]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy,
                              generators=generators)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            if logprobs:
                scaled = logits.float() / temperature
                sampled_logprobs.append(scaled.gather(-1, nxt[:, None]).squeeze(-1) - scaled.logsumexp(-1))
            done = done | (nxt == eos)
            if bool(done.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=attention, position_ids=next_pos[:, None],
                        use_cache=True, **kw)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        model.train(was_training)
        generated = torch.stack(tokens, dim=1) if tokens else torch.empty(B, 0, dtype=torch.long, device=repeat.device)
        response_ids, mask, truncated = split_responses(generated, eos, pad)
        rows = [e for e in examples for _ in range(n)]
        texts = policy.tokenizer.batch_decode(torch.where(mask, response_ids, torch.full_like(response_ids, pad)),
                                              skip_special_tokens=True)
        prompt_ids = [e.id for e in rows]
        extra = {}
        if logprobs:
            lp = torch.stack(sampled_logprobs, dim=1) if sampled_logprobs else torch.zeros(B, 0, device=mask.device)
            extra["rollout_logprobs"] = lp * mask
        return RolloutBatch(
            prompt_ids=prompt_ids,
            group_index=group_index_of(prompt_ids).to(self.device),
            mask=mask.to(torch.float32),
            prompts=[e.prompt for e in rows],
            answers=[e.answer for e in rows],
            responses=texts,
            response_ids=response_ids,
            truncated=truncated,
            examples=rows,
            prompt_tokens=prompt_tokens,
            prompt_mask=prompt_mask,
            extra=extra,
        )


def split_responses(tokens: "Tensor", eos_id: int, pad_id: int) -> tuple["Tensor", "Tensor", "Tensor"]:
    """Generated tokens (B, T) → ids with padding after the first EOS, mask (EOS included),
    and whether each response hit the length limit without an EOS."""
    is_eos = tokens == eos_id
    seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    mask = ~seen_before  # tokens up to and including the first EOS
    ids = torch.where(mask, tokens, torch.full_like(tokens, pad_id))
    truncated = ~is_eos.any(-1)
    return ids, mask, truncated


from shapeflow.runtime.vllm_engine import VllmEngine  # noqa: E402  (vllm itself is imported on first use)

ENGINES: dict[str, Callable[..., Any]] = {"generate": GenerateEngine, "vllm": VllmEngine}
