"""The fp32 artifact of a tiny random llama against transformers: logits and greedy tokens."""

import numpy as np

from reference import torch_greedy, torch_logits

from onnxlm.runtime.generate import decode_one_token, prefill


def test_prefill_and_decode_logits_match_transformers(tiny_artifact, tiny_torch):
    ids = tiny_artifact.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    cache = tiny_artifact.session.new_cache()
    ours = [prefill(tiny_artifact.session, cache, ids[:6])]
    for token in ids[6:]:
        ours.append(decode_one_token(tiny_artifact.session, cache, token))
    ref = torch_logits(tiny_torch, ids)[5:]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.stack(ours), ref, atol=1e-4, rtol=0)


def test_batched_step_matches_single_rows(tiny_artifact):
    session = tiny_artifact.session
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    both = session.step(ids, session.new_cache(batch=2))
    first = session.step(ids[:1], session.new_cache())
    np.testing.assert_allclose(both[:1], first, atol=1e-5)


def test_greedy_64_tokens_identical_to_transformers(tiny_artifact, tiny_torch):
    ids = tiny_artifact.tokenizer.encode("In 2007, version 3")
    ours = list(tiny_artifact.generate_ids(ids, max_new_tokens=64, ignore_eos=True))
    assert len(ours) == 64
    assert ours == torch_greedy(tiny_torch, ids, 64)


def test_runtime_imports_no_torch(tiny_artifact):
    import subprocess
    import sys

    code = (
        "import sys, onnxlm; a = onnxlm.load(sys.argv[1]); "
        "print(a.generate('fox', max_new_tokens=4, chat=False)); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'runtime imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_artifact.directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
