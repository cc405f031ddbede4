"""What a stage can ask of a rollout, and where each need lives in a recorded-rollout file.

A stage declares ``needs=("entropy", ...)``; the compiler unions the needs of the graph so
the rollout engine computes exactly what is used (hidden states only when a stage asks for
them). Engines declare which needs they provide; the trainer provides the update-phase ones
(current-policy and reference log-probs) with a forward pass of its own.
"""

from __future__ import annotations

from shapeflow._record import Record, record


class MissingNeed(LookupError):
    """A stage asked the batch for something this rollout did not record (raised by
    ``RolloutBatch``; defined here so that stage modules need not import the runtime)."""


@record
class Need(Record):
    name: str
    level: str  # "seq" (one per response), "tok" (one per token) or "vec" (a vector per token)
    field: str  # where `--record` writes it and `replay` reads it; "extra.X" lives under `extra`
    doc: str
    provider: str = "engine"  # "engine" (the rollout engine), "trainer" (a forward pass of its own) or
    # "model" (a setup stage's model, e.g. a critic, that declares it `provides` the need)


NEEDS: dict[str, Need] = {
    n.name: n
    for n in (
        Need("prompt", "seq", "prompt", "the prompt text"),
        Need("answer", "seq", "answer", "the reference answer of the prompt"),
        Need("response", "seq", "response", "the decoded response text"),
        Need("response_ids", "tok", "response_ids", "the response token ids"),
        Need("logprobs", "tok", "logprobs", "behaviour log-probs of the sampled tokens (old policy)"),
        Need("truncated", "seq", "truncated", "the response stopped at the length limit without end-of-sequence"),
        Need("scores", "seq", "scores", "scalar scores recorded with each response (a task's own scorer, or a recorded file)"),
        Need("entropy", "tok", "entropy", "behaviour-policy token entropy over the full vocabulary"),
        Need("hidden_states", "vec", "extra.hidden_states", "last-layer hidden states of the response tokens"),
        Need("ref_logprobs", "tok", "ref_logprobs", "reference-model log-probs of the sampled tokens", "trainer"),
        Need("greedy_baseline", "seq", "extra.greedy_baseline",
             "the reward of a greedy response to the same prompt, scored by the stage's own `rewards` input "
             "(ReMax); one extra greedy rollout per prompt", "trainer"),
        Need("policy_logprobs", "tok", "extra.policy_logprobs", "current-policy log-probs (update phase)", "trainer"),
        Need("policy_entropy", "tok", "extra.policy_entropy", "current-policy token entropy (update phase, with gradient)", "trainer"),
        Need("self_certainty", "tok", "extra.self_certainty",
             "logsumexp(z/τ) − mean(z/τ) over the vocabulary at each response position, τ the rollout temperature "
             "(UCAS); computed at every position of the padded batch, padding included, as verl's actor does",
             "trainer"),
        Need("sampled_logit", "tok", "extra.sampled_logit",
             "the raw logit (before temperature) of each sampled token (UCAS token certainty)", "trainer"),
        Need("rollout_logprobs", "tok", "extra.rollout_logprobs",
             "log-probs of the sampled tokens as the rollout engine computed them while sampling (temperature "
             "applied, no top-k/top-p), beside the trainer's recomputation `logprobs` (mismatch correction)"),
        Need("sum_pi_squared", "tok", "extra.sum_pi_squared",
             "Σ_v π(v)² of the behaviour policy's next-token distribution at each response position, at the "
             "rollout temperature (verl calculate_sum_pi_squared; the optimal token baseline)", "trainer"),
        Need("values", "tok", "extra.values",
             "the critic's value V(s_t) of the state each response token is chosen in, from the behaviour pass "
             "(old values; needs a critic: models.value_head or models.critic)", "model"),
        Need("current_values", "tok", "extra.current_values",
             "the critic's values under the current weights, with gradient (update phase; needs a critic)", "model"),
    )
}

# Needs with a parameter: a stage declares ``"logprobs@{t_high}"`` and the checker fills in the
# stage's parameter value, giving e.g. ``logprobs@1.2`` (DCPO's old-policy log-probs at T = 1.2).
TEMPLATES: dict[str, Need] = {
    n.name: n
    for n in (
        Need("logprobs@", "tok", "extra.logprobs@",
             "behaviour log-probs of the sampled tokens at another temperature T: log softmax(z/T)[y] "
             "(one extra log-softmax of the behaviour pass's logits per temperature)", "trainer"),
    )
}


def need_info(name: str) -> Need | None:
    """The Need called ``name``: a fixed one, or a filled-in template (``logprobs@1.2``)."""
    if name in NEEDS:
        return NEEDS[name]
    prefix, at, value = name.partition("@")
    template = TEMPLATES.get(prefix + at) if at else None
    if template is None or not value:
        return None
    return Need(name, template.level, template.field + value, template.doc.replace(" T", f" T = {value}", 1),
                template.provider)


def template_param(name: str) -> str | None:
    """``"logprobs@{t_high}"`` → ``"t_high"``: the parameter a declared template need names."""
    prefix, at, rest = name.partition("@")
    if at and prefix + at in TEMPLATES and rest.startswith("{") and rest.endswith("}"):
        return rest[1:-1]
    return None


def resolve_needs(needs, params: dict) -> frozenset[str]:
    """A node's needs with each template filled in from its parameters (``logprobs@1.2``)."""
    out = set()
    for name in needs:
        param = template_param(name)
        out.add(name if param is None else f"{name.partition('@')[0]}@{float(params[param]):g}")
    return frozenset(out)


def provided_by_trainer(name: str) -> bool:
    """Computed by the trainer whatever the engine: its own forward passes, or a model it trains."""
    info = need_info(name)
    return info is not None and info.provider in ("trainer", "model")


TRAINER_PROVIDES = frozenset(n.name for n in NEEDS.values() if n.provider == "trainer")
