"""How to decode, as plain data, and the functions that pick the loop and the executor for it.

greedy and sample run generate.generate_with on an executor (execution.py): the full cache, a KV policy
(bounded_cache.Bounded) or early exit (early_exit.EarlyExit), chosen by `executor_for`; beam runs
beam.beam_search; speculative runs speculative.speculative_generate with a drafter (prompt lookup or a draft
decoder). All of them stream token ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from onnxlm.errors import OnnxlmError
from onnxlm.runtime.beam import beam_search
from onnxlm.runtime.bounded_cache import Bounded
from onnxlm.runtime.early_exit import EarlyExit, ExitSegments
from onnxlm.runtime.execution import Executor, Plain
from onnxlm.runtime.generate import generate_with
from onnxlm.runtime.kv_policy import KVPolicyConfig
from onnxlm.runtime.sampling import Sampler, SamplingConfig
from onnxlm.runtime.session import DecoderSession
from onnxlm.runtime.speculative import ModelDrafter, PromptLookup, SpeculativeStats, speculative_generate
from onnxlm.runtime.static import Static, is_static

MODES = ("greedy", "sample", "beam", "speculative")


@dataclasses.dataclass(frozen=True)
class Decoding:
    mode: str = "greedy"
    sampling: SamplingConfig | None = None  # sample, or speculative with sampling verification
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    prompt_lookup: bool = False  # speculative: draft from n-gram matches in the context
    max_draft: int = 8  # speculative: most tokens per draft (the length adapts below it)
    chunk_size: int | None = None  # greedy/sample: prefill in chunks of this many tokens
    kv_policy: KVPolicyConfig = KVPolicyConfig()  # greedy/sample: the KV cache's eviction policy
    halt_threshold: float | None = None  # greedy/sample: QuickSilver token halting (quicksilver artifacts)
    exit_threshold: float | None = None  # greedy/sample: early exit when the drift is below it (early-exit artifacts)

    def __post_init__(self):
        if self.mode not in MODES:
            raise OnnxlmError(f"unknown decoding '{self.mode}': choose one of {', '.join(MODES)}")
        if self.mode == "sample" and self.sampling is None:
            object.__setattr__(self, "sampling", SamplingConfig())
        if self.mode in ("greedy", "beam") and self.sampling is not None:
            raise OnnxlmError(f"sampling options do not apply to --decoding {self.mode}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise OnnxlmError(f"chunk size must be at least 1, got {self.chunk_size}")
        if self.kv_policy.name != "full" and self.mode not in ("greedy", "sample"):
            raise OnnxlmError(f"--kv-policy {self.kv_policy.name} runs with greedy or sampled decoding, "
                              f"not {self.mode}")
        if self.halt_threshold is not None and (self.mode not in ("greedy", "sample") or
                                                self.kv_policy.name != "full"):
            raise OnnxlmError("--halt-threshold runs with greedy or sampled decoding and the full KV cache")
        if self.halt_threshold is not None and self.halt_threshold < 0:
            raise OnnxlmError(f"--halt-threshold must be >= 0, got {self.halt_threshold}")
        if self.exit_threshold is not None and (self.mode not in ("greedy", "sample") or self.kv_policy.name != "full"
                                                or self.halt_threshold is not None or self.chunk_size is not None):
            raise OnnxlmError("--exit-threshold runs with greedy or sampled decoding, the full KV cache and no "
                              "other option of the cache")
        if self.kv_policy.name != "full" and self.chunk_size is not None:
            raise OnnxlmError("--kv-policy chunks the prompt to fit its budget: leave out --chunk-size")


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingConfig))


def default_decoding(generation: dict | None, overrides: dict | None = None, sample: bool = False) -> Decoding:
    """The decoding an artifact records as its default (manifest "generation", frontend/generation_defaults.py),
    with sampling `overrides` on top; greedy for an artifact that records none. Overrides, or `sample`, ask for
    sampling: from the recorded settings when the artifact samples, else from SamplingConfig's defaults."""
    generation, overrides = generation or {"mode": "greedy"}, overrides or {}
    recorded = generation.get("mode", "greedy")
    if recorded not in ("greedy", "sample"):
        raise OnnxlmError(f"the artifact's default decoding '{recorded}' is not greedy or sample")
    if recorded == "greedy" and not (overrides or sample):
        return Decoding()
    settings = {k: v for k, v in generation.items() if k in SAMPLING_FIELDS} if recorded == "sample" else {}
    return Decoding("sample", SamplingConfig(**{**settings, **overrides}))


def decode(
    model: DecoderSession,
    prompt_ids: list[int],
    max_new_tokens: int,
    decoding: Decoding,
    stop_ids: tuple[int, ...] = (),
    draft_model: DecoderSession | None = None,
    stats: SpeculativeStats | None = None,
    exits: ExitSegments | None = None,
    prefix_cache=None,
) -> Iterator[int]:
    """New token ids for `prompt_ids` under `decoding`; beam search yields its best hypothesis at the end."""
    sampler = Sampler(decoding.sampling)
    if decoding.mode == "beam":
        result = beam_search(model, prompt_ids, max_new_tokens, decoding.num_beams, decoding.length_penalty,
                             decoding.early_stopping, stop_ids)
        return iter(result.tokens)
    if decoding.mode == "speculative":
        if decoding.prompt_lookup == (draft_model is not None):
            raise OnnxlmError("speculative decoding needs one draft source: a draft artifact or prompt lookup")
        if draft_model is not None and draft_model.info.vocab_size != model.info.vocab_size:
            raise OnnxlmError(f"the draft's vocabulary ({draft_model.info.vocab_size}) differs from the target's "
                              f"({model.info.vocab_size}): it needs the same tokenizer")
        drafter = PromptLookup() if decoding.prompt_lookup else ModelDrafter(
            draft_model, len(prompt_ids) + max_new_tokens)
        return speculative_generate(model, drafter, prompt_ids, max_new_tokens, stop_ids, sampler,
                                    decoding.max_draft, stats)
    executor = executor_for(model, decoding.kv_policy, decoding.halt_threshold, decoding.exit_threshold, exits,
                            decoding.chunk_size, prefix_cache)
    return generate_with(executor, prompt_ids, max_new_tokens, stop_ids, sampler)


def executor_for(model: DecoderSession, kv_policy: KVPolicyConfig | None = None, halt_threshold: float | None = None,
                 exit_threshold: float | None = None, exits: ExitSegments | None = None,
                 chunk_size: int | None = None, prefix_cache=None) -> Executor:
    """How the steps of a greedy or sampled run (or a perplexity) execute: with early exit at `exit_threshold`,
    under an evicting `kv_policy`, or on the full cache (token halting at `halt_threshold` on a quicksilver
    artifact, the prompt in chunks of `chunk_size`, from its longest prefix in `prefix_cache`)."""
    evicting = kv_policy is not None and kv_policy.name != "full"
    if is_static(model):
        if exit_threshold is not None or halt_threshold is not None or chunk_size is not None or prefix_cache:
            raise OnnxlmError("a static artifact runs its own P-token prefill chunks and C-slot cache: no early "
                              "exit, token halting, --chunk-size or prefix reuse")
        return Static(model, kv_policy)
    if exit_threshold is not None:
        if halt_threshold is not None or evicting:
            raise OnnxlmError("early exit does not combine with token halting or an evicting KV policy")
        return EarlyExit(model, exits or ExitSegments(model), exit_threshold)
    if evicting:
        if halt_threshold is not None:
            raise OnnxlmError("token halting and an evicting KV policy do not combine")
        return Bounded(model, kv_policy)
    return Plain(model, chunk_size, prefix_cache, halt_threshold=halt_threshold)
