"""Dynamic early exit (recipe early-exit, --exit-threshold) on a tiny 4-layer model with its exit after layer 2,
against transformers: exit steps give the exit's logits, every other step the full model's (the lazily
recomputed deep K/V are exact), and the segments equal the full graph when nothing exits."""

import numpy as np
import pytest

from conftest import write_tiny_llama
from onnxlm.errors import OnnxlmError
from onnxlm.runtime.early_exit import ExitSegments, ExitState, exit_generate, exit_perplexity, exit_step
from onnxlm.runtime.generate import generate_tokens, prefill
from reference import exit_reference

TEXT = "The quick brown fox jumps over the lazy dog. " * 3
LAYER = 2


@pytest.fixture(scope="module")
def exit_artifact(tmp_path_factory):
    import onnxlm
    import transformers

    hf = write_tiny_llama(tmp_path_factory.mktemp("exit") / "hf", layers=4)
    art = onnxlm.optimize(str(hf), recipe="early-exit", output=tmp_path_factory.mktemp("exit") / "art",
                          overrides={"early_exit": {"layer": LAYER}})
    return art, transformers.AutoModelForCausalLM.from_pretrained(hf).eval()


def test_exit_and_full_steps_match_transformers(exit_artifact):
    art, torch_model = exit_artifact
    ids = art.tokenizer.encode(TEXT)
    full, early, drift = exit_reference(torch_model, ids, LAYER)
    threshold = float(np.median(drift[1:]))  # about half the steps exit
    segments = ExitSegments(art.session)
    cache = art.session.new_cache(capacity=len(ids))
    prefill(art.session, cache, ids[:1])
    state = ExitState(lower=1, upper=1)
    for i in range(1, len(ids)):
        logits = exit_step(segments, cache, state, ids[i], threshold)
        expected = early[i] if drift[i] < threshold else full[i]
        np.testing.assert_allclose(logits, expected, atol=2e-4, err_msg=f"position {i}")
    assert state.exits == int((drift[1:] < threshold).sum()) and 0 < state.exits < len(ids) - 1
    assert segments.layer == LAYER


def test_threshold_zero_is_the_full_model(exit_artifact):
    art, _ = exit_artifact
    ids = art.tokenizer.encode(TEXT)
    segments = ExitSegments(art.session)
    assert list(exit_generate(art.session, segments, ids, 12, 0.0)) == list(generate_tokens(art.session, ids, 12))
    scored = exit_perplexity(art.session, segments, ids, 0.0, window=len(ids))
    assert scored["exit_rate"] == 0
    assert scored["ppl"] == pytest.approx(art.perplexity(text=TEXT, window=len(ids))["ppl"], rel=1e-4)
    assert exit_perplexity(art.session, segments, ids, 1e9, window=len(ids))["exit_rate"] == 1


def test_exit_threshold_needs_the_early_exit_artifact(tiny_artifact, exit_artifact, capsys):
    from cli_helpers import run_cli

    with pytest.raises(OnnxlmError, match="early-exit"):
        ExitSegments(tiny_artifact.session)
    art, _ = exit_artifact
    code, out, _ = run_cli(capsys, "generate", art.directory, "--prompt", "the fox", "--no-chat",
                           "--max-new-tokens", "8", "--exit-threshold", "0.0")
    reference = run_cli(capsys, "generate", art.directory, "--prompt", "the fox", "--no-chat", "--max-new-tokens", "8")
    assert code == 0 and out == reference[1]
    assert "exits/lower.onnx" in art.manifest["files"]
