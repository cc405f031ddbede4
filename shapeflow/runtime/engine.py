"""Rollout engines and the one function that turns a policy's logits into token log-probs.

`token_logprobs` is used by the rollout phase (behaviour log-probs, entropy, hidden states,
reference log-probs) and by the update phase (current-policy log-probs), with the same
temperature handling and, for the first minibatch, the same row sets and shapes, so the
importance ratio starts at exactly 1.

Engines only sample tokens. Each is registered under the name a spec gives to
``rollouts.sample(engine = ...)``; `shapeflow.stdlib.rollouts` declares what each provides.
"""

from __future__ import annotations

from dataclasses import dataclass
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
) -> TokenStats:
    """Log π(y_t | x, y_<t) of each response token under ``model`` at ``temperature``.

    Shapes: prompt (B, P) left-padded, response (B, T) right-padded. Position ids follow the
    attention mask, as `generate` assigns them, so a left-padded prompt sees the same
    positions here as when it was sampled.
    """
    input_ids = torch.cat([prompt_tokens, response_ids], dim=1)  # (B, P+T)
    attention = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                output_hidden_states=hidden, use_cache=False)
    P = prompt_tokens.shape[1]
    logits = out.logits[:, P - 1 : -1, :].float() / temperature  # (B, T, V) predicts response tokens
    logz = torch.logsumexp(logits, dim=-1)  # (B, T)
    chosen = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    mask = response_mask.to(logits.dtype)
    stats = TokenStats(logprobs=(chosen - logz) * mask)
    if entropy:
        probs = torch.softmax(logits, dim=-1)
        stats.entropy = (logz - (probs * logits).sum(-1)) * mask
    if hidden:
        stats.hidden = out.hidden_states[-1][:, P:, :] * mask.unsqueeze(-1)
    return stats


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
                 top_p: float, top_k: int, greedy: bool = False, chat: bool = False) -> RolloutBatch:
        """``n`` responses for each example (one batched call); responses of one example are adjacent."""
        policy = self.policy
        model = policy.model
        prompt_tokens, prompt_mask = self.encode_prompts([e.prompt for e in examples], chat=chat)
        prompt_tokens = prompt_tokens.repeat_interleave(n, dim=0)  # (B, P), B = len(examples) * n
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        was_training = model.training
        model.eval()
        out = model.generate(
            input_ids=prompt_tokens,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_p=top_p if not greedy else None,
            top_k=top_k if not greedy else None,
            pad_token_id=policy.pad_token_id,
            eos_token_id=policy.eos_token_id,
        )
        model.train(was_training)
        response_ids, mask, truncated = split_responses(out[:, prompt_tokens.shape[1]:], policy.eos_token_id,
                                                        policy.pad_token_id)
        rows = [e for e in examples for _ in range(n)]
        texts = policy.tokenizer.batch_decode(response_ids * mask.long() + policy.pad_token_id * (1 - mask.long()),
                                              skip_special_tokens=True)
        prompt_ids = [e.id for e in rows]
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


ENGINES: dict[str, Callable[..., Any]] = {"generate": GenerateEngine}
