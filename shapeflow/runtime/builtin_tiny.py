"""`builtin:arith-tiny`: a ~0.5M-parameter Qwen2 with a character tokenizer, warmed up on addition.

The recipe: a Qwen2 config (hidden 128, 2 layers, 4 heads), a character-level tokenizer made
in code (printable ASCII plus <pad> <bos> <eos> <unk>), then a short supervised warm-up on the
train split of 2-digit + 1-digit addition so that RL starts from a policy that is right some
of the time (about 20% greedy on the held-out split; GRPO at lr 1e-4 lifts it to 54-58%
in 500 steps, measured on a 2-core CPU). The result is saved as an ordinary Hugging Face folder and cached.
"""

from __future__ import annotations

import string
from pathlib import Path

from shapeflow.runtime.models import builtin

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer():
    """A fast tokenizer with one token per character; `<bos>` is added in front of every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.padding_side = "left"
    return fast


def tiny_qwen2(vocab_size: int, *, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def supervised_warmup(model, tokenizer, examples, *, steps: int, batch_size: int, lr: float,
                      weight_decay: float, seed: int, on_step=None) -> list[float]:
    """Teacher forcing on ``prompt + answer + <eos>``, loss on the answer tokens only."""
    import torch

    rows = [(tokenizer(e.prompt)["input_ids"], tokenizer(e.answer, add_special_tokens=False)["input_ids"])
            for e in examples]
    width = max(len(p) + len(a) + 1 for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = p + a + [tokenizer.eos_token_id]
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a + [tokenizer.eos_token_id])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (batch_size,), generator=gen)
        out = model(input_ids=ids[idx], attention_mask=attn[idx], labels=labels[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if on_step is not None:
            on_step(len(losses), model)
    model.eval()
    return losses


WARMUP_STEPS = 250  # mid phase transition: ~20% held-out greedy accuracy, room for RL to show


@builtin("arith-tiny", version="2", doc="0.5M-parameter Qwen2, character tokenizer, 250-step warm-up on 2+1-digit addition")
def build_arith_tiny(folder: Path) -> None:
    from shapeflow.stdlib.tasks import arithmetic

    tokenizer = char_tokenizer()
    model = tiny_qwen2(len(tokenizer))
    train = arithmetic(digits=2, second_digits=1, split="train", test_fraction=0.1, size=None, seed=0)
    supervised_warmup(model, tokenizer, train.examples, steps=WARMUP_STEPS, batch_size=128, lr=3e-3,
                      weight_decay=0.0, seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
