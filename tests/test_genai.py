"""The artifact runs in onnxruntime-genai with no onnxlm: README's lines, and token-for-token greedy parity."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from onnxlm.runtime.decoding import Decoding

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is part of the test extras")

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_genai_snippet() -> str:
    section = README.read_text().split("## Deploy with plain ONNX Runtime GenAI", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def genai_greedy(directory, ids: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids):]


def test_readme_lines_run_without_onnxlm(tiny_artifact, tmp_path):
    code = readme_genai_snippet().replace('"out/fp32"', repr(str(tiny_artifact.directory)))
    guard = "\nimport sys; assert not any(m.startswith('onnxlm') for m in sys.modules), 'onnxlm was imported'\n"
    script = tmp_path / "deploy.py"
    script.write_text(code + guard)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_genai_config_shares_the_kv_buffer_only_on_gqa_graphs(tiny_artifacts):
    import json

    lowered = json.loads((tiny_artifacts("fp32").directory / "genai_config.json").read_text())
    plain = json.loads((tiny_artifacts("fp32-plain").directory / "genai_config.json").read_text())
    assert lowered["search"]["past_present_share_buffer"] is True
    assert plain["search"]["past_present_share_buffer"] is False
    assert lowered["model"]["decoder"]["num_key_value_heads"] == 2


@pytest.mark.parametrize("recipe", ["fp32-plain", "fp32"])
def test_tiny_greedy_equals_onnxlm(tiny_artifacts, recipe):
    art = tiny_artifacts(recipe)
    ids = art.tokenizer.encode("The quick brown fox")
    ours = list(art.generate_ids(ids, max_new_tokens=24, ignore_eos=True, decoding=Decoding()))
    assert genai_greedy(art.directory, ids, 24) == ours


@pytest.mark.integration
@pytest.mark.parametrize("prompt", ["Write a haiku about the sea", "Summarize: GPL version 3 was published in 2007."])
def test_smollm2_greedy_equals_onnxlm(smollm2_artifact, prompt):
    """Both stop at EOS; genai leaves the EOS token out of the sequence, onnxlm yields it."""
    ids = smollm2_artifact.prompt_ids(prompt)
    ours = list(smollm2_artifact.generate_ids(ids, max_new_tokens=64, decoding=Decoding()))
    if ours[-1] in smollm2_artifact.info.eos_token_ids:
        ours = ours[:-1]
    assert genai_greedy(smollm2_artifact.directory, ids, 64) == ours
    assert len(ours) > 8


@pytest.mark.integration
def test_smollm2_genai_tokenizer_agrees_on_chat_prompts(smollm2_artifact):
    tokenizer = og.Tokenizer(og.Model(str(smollm2_artifact.directory)))
    text = "<|im_start|>user\nWrite a haiku about the sea<|im_end|>\n<|im_start|>assistant\n"
    assert [int(t) for t in tokenizer.encode(text)] == smollm2_artifact.tokenizer.encode(text)
