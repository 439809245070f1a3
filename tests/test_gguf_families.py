"""GGUF files of the families beyond llama (qwen3, phi3, gemma2, gemma3) written the way llama.cpp's converter
lays them out (conftest.write_tiny_gguf): the `fp32` artifact's logits match the model transformers' GGUF loader
builds from the same file, and `int4` imports every linear of a Q4_1/Q8_0 file exactly."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_tiny_gguf, write_tiny_llama
from test_families import RESULTS, record

import onnxlm

# variant (tests/tiny_families.py), GGUF architecture, shape: transformers' qwen3 GGUF loader does not read the
# head size (it keeps Qwen3's 128, as every Qwen3 has); GGUF's qwen3moe has no dense layers (no mlp_only_layers)
GGUF_FAMILIES = [("llama", "llama", {}), ("qwen2-untied", "qwen2", {}),
                 ("qwen3", "qwen3", {"head_dim": 128}), ("phi3", "phi3", {}), ("gemma2-softcap", "gemma2", {}),
                 ("gemma3-text", "gemma3", {}), ("qwen3-moe-normed", "qwen3moe", {"mlp_only_layers": []})]


def note(variant: str, text: str) -> None:
    """Add to the variant's GGUF cell of docs/architectures.md."""
    cell = RESULTS.get(variant, {}).get("GGUF")
    record(variant, "GGUF", f"{cell}; {text}" if cell else text)


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    made = {}

    def get(variant, arch, shape, quantized=False):
        if (variant, quantized) not in made:
            root = tmp_path_factory.mktemp(f"gguf-{variant}")
            hf = write_tiny_llama(root / "hf", variant=variant, **shape)
            made[variant, quantized] = write_tiny_gguf(hf, root / f"{arch}.gguf", quantized=quantized, arch=arch)
        return made[variant, quantized]

    return get


@pytest.mark.parametrize("variant, arch, shape", GGUF_FAMILIES)
def test_fp32_from_a_gguf_matches_transformers_gguf_loader(family_gguf, variant, arch, shape, tmp_path):
    import torch
    import transformers

    path = family_gguf(variant, arch, shape)
    art = onnxlm.optimize(str(path), recipe="fp32", output=tmp_path / "fp32")
    assert art.manifest["model"]["family"]["family"] == transformers.AutoConfig.from_pretrained(
        path.parent, gguf_file=path.name).model_type
    from onnxlm.frontend.load_gguf import config_from_gguf, read_gguf_metadata

    # (with the expert sizes and top-k renormalization the loader leaves out of the header: load_gguf.MOE_KEYS)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager",
        config=config_from_gguf(path, read_gguf_metadata(path))).eval()
    ids = np.random.default_rng(7).integers(3, 320, 16).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = art.session.step(np.asarray([ids]), art.session.new_cache(capacity=32))[0]
    diff, bound = float(np.abs(ours - ref).max()), 1e-4 + 1e-5 * float(np.abs(ref).max())
    note(variant, f"`{arch}`: fp32 parity {diff:.1e}" if diff <= bound else f"`{arch}`: fp32 parity **{diff:.1e}**")
    assert diff <= bound


@pytest.mark.parametrize("variant, arch, shape", GGUF_FAMILIES)
def test_int4_imports_every_linear_of_a_family_gguf_exactly(family_gguf, variant, arch, shape, tmp_path):
    path = family_gguf(variant, arch, shape, quantized=True)
    art = onnxlm.optimize(str(path), recipe="int4", output=tmp_path / "int4",
                          overrides={"quant_gguf_exact": {"accuracy_level": 0}})
    report = next(r for r in art.manifest["passes"] if r["name"] == "quant_gguf_exact")
    experts = report["check"]["moe_not_imported"]
    exact = report["check"]["weights_bit_identical"] and len(report["notes"]) == bool(experts)
    note(variant, "int4 from Q4_1/Q8_0 blocks " + ("exact" if exact else "**not exact**") + (
        f" for the linears; {experts} MoE nodes' experts requantized (QMoE)" if experts else ""))
    assert exact
    assert report["matched"].get("matmul_nbits_q4_1", 0) >= 2 * 2  # at least attention and MLP in both layers
