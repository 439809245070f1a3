"""Runtime pieces that need no model: streaming detokenization and the NLL arithmetic."""

import math

import numpy as np

from conftest import build_tiny_tokenizer
from onnxlm.model_info import ModelInfo
from onnxlm.metrics import window_nll
from onnxlm.runtime.tokenizer import TextTokenizer


def make_tokenizer(tmp_path):
    build_tiny_tokenizer(320).save(str(tmp_path / "tokenizer.json"))
    info = ModelInfo("llama", 1, 1, 1, 1, 1, 320, 1024, 1e4, bos_token_id=1, eos_token_ids=[2])
    return TextTokenizer(tmp_path, info)


def test_stream_is_utf8_safe_and_complete(tmp_path):
    tok = make_tokenizer(tmp_path)
    text = "Caf\u00e9 \u2014 \u3053\u3093\u306b\u3061\u306f \U0001f30a and 2007 \U0001f600!"
    ids = tok.encode(text)
    # Characters unseen in training fall back to byte tokens, so some characters span several tokens.
    assert len(ids) > len(text.split())
    pieces = list(tok.stream(iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_bos_is_added_only_when_asked(tmp_path):
    tok = make_tokenizer(tmp_path)
    assert tok.encode("fox")[0] != 1
    assert tok.encode("fox", add_bos=True)[0] == 1


def test_window_nll_matches_the_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32) * 4
    targets = np.array([0, 3, 6, 2, 2])
    expected = 0.0
    for row, t in zip(logits.astype(np.float64), targets):
        expected -= row[t] - math.log(np.exp(row).sum())
    assert math.isclose(window_nll(logits, targets), expected, rel_tol=1e-12)
