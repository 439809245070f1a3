"""The decoding loops on the tiny model: speculative decoding (greedy identity, sampled distribution), beam search
against transformers, chunked prefill, the Sarathi scheduler, and the CLI flags."""

import numpy as np
import pytest

from cli_helpers import run_cli
from conftest import write_tiny_llama
from onnxlm.errors import OnnxlmError
from onnxlm.runtime.beam import beam_search
from onnxlm.runtime.decoding import Decoding
from onnxlm.runtime.generate import generate_tokens
from onnxlm.runtime.sampling import Sampler, SamplingConfig, warp
from onnxlm.runtime.scheduler import Request, serve
from onnxlm.runtime.speculative import ModelDrafter, PromptLookup, SpeculativeStats, speculative_generate

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model with other random weights: a draft that the target often rejects."""
    import onnxlm

    hf = write_tiny_llama(tmp_path_factory.mktemp("other") / "hf", seed=1)
    return onnxlm.optimize(str(hf), recipe="fp32", output=tmp_path_factory.mktemp("other") / "fp32")


def prompt_ids(art):
    return art.tokenizer.encode(PROMPT)


class WrongEveryThird:
    """A drafter that drafts the target's own model but corrupts every third token: rejections are certain."""

    def __init__(self, session):
        self.inner = ModelDrafter(session, 200)

    def propose(self, context, n, sampler):
        draft = self.inner.propose(context, n, sampler)
        draft.tokens = [t + 1 if i % 3 == 2 else t for i, t in enumerate(draft.tokens)]
        return draft


@pytest.mark.parametrize("source", ["lookup", "same", "other", "wrong"])
def test_speculative_greedy_equals_greedy(tiny_any_artifact, other_model, tiny_artifacts, source):
    art = tiny_any_artifact
    ids = prompt_ids(art)
    drafter = {"lookup": lambda: PromptLookup(),
               "same": lambda: ModelDrafter(tiny_artifacts("fp32-plain").session, 200),
               "other": lambda: ModelDrafter(other_model.session, 200),
               "wrong": lambda: WrongEveryThird(tiny_artifacts("fp32-plain").session)}[source]()
    stats = SpeculativeStats()
    ours = list(speculative_generate(art.session, drafter, ids, 48, stats=stats))
    assert ours == list(generate_tokens(art.session, ids, 48))
    assert stats.emitted == 48 and stats.drafted > 0
    if source == "same":  # the same weights draft: every drafted token is accepted
        assert stats.accepted == stats.drafted and stats.target_calls < 48 / 3
    if source == "wrong":  # rejections happen, so the rollback paths ran
        assert stats.accepted < stats.drafted


def test_speculative_stops_at_eos_and_max_tokens(tiny_artifact):
    ids = prompt_ids(tiny_artifact)
    plain = list(generate_tokens(tiny_artifact.session, ids, 30))
    stop = (plain[10],)
    expected = list(generate_tokens(tiny_artifact.session, ids, 30, stop_ids=stop))
    got = list(speculative_generate(tiny_artifact.session, PromptLookup(), ids, 30, stop_ids=stop))
    assert got == expected and got[-1] == plain[10] and len(got) <= 11
    assert len(list(speculative_generate(tiny_artifact.session, PromptLookup(), ids, 1))) == 1


def test_speculative_sampling_keeps_the_target_distribution(tiny_artifact, other_model):
    """Chi-square on the first two sampled tokens (top-k 3, so 9 joint outcomes) against the target's exact joint
    distribution, with a different model drafting."""
    from test_sampling import chi2, chi2_critical

    target = tiny_artifact.session
    ids = prompt_ids(tiny_artifact)
    config = SamplingConfig(top_k=3)
    first = warp(target.step(np.asarray([ids]), target.new_cache(capacity=64))[0, -1], config, ids)
    joint = {}
    for a in np.flatnonzero(first):
        second = warp(target.step(np.asarray([ids + [a]]), target.new_cache(capacity=64))[0, -1], config, ids + [a])
        for b in np.flatnonzero(second):
            joint[(int(a), int(b))] = first[a] * second[b]
    cells = sorted(joint)
    sampler = Sampler(SamplingConfig(top_k=3, seed=0))
    drafter = ModelDrafter(other_model.session, 64)
    stats = SpeculativeStats()
    counts = np.zeros(len(cells))
    for _ in range(1500):
        pair = tuple(speculative_generate(target, drafter, ids, 2, sampler=sampler, max_draft=1, stats=stats))
        counts[cells.index(pair)] += 1
    stat, dof = chi2(counts, np.asarray([joint[c] for c in cells]))
    assert stat < chi2_critical(dof), (stat, dof)
    assert 0 < stats.accepted < stats.drafted  # both the accept and the residual paths were taken


@pytest.mark.parametrize("length_penalty,early_stopping,eos", [(1.0, False, None), (0.5, True, "seen"),
                                                               (2.0, "never", "seen")])
def test_beam_search_equals_transformers(tiny_artifact, tiny_torch, length_penalty, early_stopping, eos):
    import torch

    ids = prompt_ids(tiny_artifact)
    eos_id = 2
    if eos == "seen":  # an EOS that the beams actually produce, so that hypotheses finish early
        eos_id = beam_search(tiny_artifact.session, ids, 12, num_beams=4).tokens[3]
    with torch.no_grad():
        ref = tiny_torch.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  num_beams=4, do_sample=False, max_new_tokens=12, length_penalty=length_penalty,
                                  early_stopping=early_stopping, eos_token_id=eos_id, pad_token_id=0)
    expected = ref[0, len(ids):].tolist()
    ours = beam_search(tiny_artifact.session, ids, 12, 4, length_penalty, early_stopping, (eos_id,)).tokens
    assert ours == expected[: len(ours)] and all(t == 0 for t in expected[len(ours):])


def test_chunked_prefill_gives_the_same_tokens(tiny_any_artifact):
    ids = prompt_ids(tiny_any_artifact) * 3
    full = list(generate_tokens(tiny_any_artifact.session, ids, 16))
    assert list(generate_tokens(tiny_any_artifact.session, ids, 16, chunk_size=5)) == full


@pytest.mark.parametrize("budget", [None, 6])
def test_scheduler_matches_one_request_at_a_time(tiny_artifact, budget):
    session = tiny_artifact.session
    ids = prompt_ids(tiny_artifact)
    requests = [Request(ids, 20), Request(ids[:4], 25), Request(ids * 4, 12, arrival_s=0.01), Request(ids[3:], 8)]
    serve(session, requests, slots=2, token_budget=budget)
    for r in requests:
        assert r.tokens == list(generate_tokens(session, r.prompt_ids, r.max_new_tokens))
        assert len(r.token_times) == len(r.tokens) and r.ttft_s >= 0


def test_scheduler_needs_a_shared_kv_graph(tiny_artifacts):
    with pytest.raises(OnnxlmError, match="GroupQueryAttention"):
        serve(tiny_artifacts("fp32-plain").session, [Request([1, 2], 2)], slots=1)


def test_decoding_options_are_checked():
    with pytest.raises(OnnxlmError, match="unknown decoding"):
        Decoding("topk")
    with pytest.raises(OnnxlmError, match="do not apply"):
        Decoding("beam", SamplingConfig(temperature=0.5))


def test_cli_generate_decodings(capsys, tiny_artifact):
    d = tiny_artifact.directory
    code, greedy_out, _ = run_cli(capsys, "generate", d, "--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat")
    assert code == 0
    code, out, err = run_cli(capsys, "generate", d, "--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat",
                             "--prompt-lookup", "--stats")
    assert code == 0 and out == greedy_out and "drafted tokens accepted" in err
    sampled = [run_cli(capsys, "generate", d, "--prompt", PROMPT, "--max-new-tokens", "12", "--no-chat",
                       "--temperature", "1.5", "--seed", "4")[1] for _ in range(2)]
    assert sampled[0] == sampled[1]
    code, _, err = run_cli(capsys, "generate", d, "--prompt", "x", "--prompt-lookup", "--draft", d)
    assert code == 2 and "one draft source" in err
    code, _, err = run_cli(capsys, "generate", d, "--prompt", "x", "--self-draft")
    assert code == 2 and "draft/" in err
    code, out, _ = run_cli(capsys, "generate", d, "--prompt", PROMPT, "--max-new-tokens", "6", "--decoding", "beam",
                           "--num-beams", "3", "--no-chat")
    assert code == 0 and out.strip()


def test_self_draft_is_the_model_without_its_least_important_layers(tiny_hf_dir, tmp_path):
    import json

    import onnxlm

    art = onnxlm.optimize(str(tiny_hf_dir), recipe="fp32", output=tmp_path / "a", self_draft_layers=1)
    manifest = json.loads((tmp_path / "a" / "draft" / "manifest.json").read_text())
    removal = next(p for p in manifest["passes"] if p["name"] == "remove_layers")
    assert manifest["model"]["num_layers"] == 1 and len(removal["check"]["removed_layers"]) == 1
    assert art.info.num_layers == 2  # the target keeps all its layers
    draft = art.self_draft()
    stats = SpeculativeStats()
    ids = prompt_ids(art)
    ours = list(art.generate_ids(ids, 24, ignore_eos=True, decoding=Decoding("speculative"), draft=draft, stats=stats))
    assert ours == list(generate_tokens(art.session, ids, 24)) and stats.drafted > 0
