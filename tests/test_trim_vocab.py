"""trim_vocab on tiny models: the kept language tokenizes, decodes and scores as before; specials are never dropped."""

import json

import numpy as np
import pytest
from conftest import CORPUS, write_tiny_llama

import onnxlm
from onnxlm.errors import OnnxlmError
from onnxlm.passes.recipe import Recipe, load_recipe
from onnxlm.passes.registry import make_pass

KEPT_TEXT = "The quick brown fox jumps over the lazy dog. Language models predict the next token from the tokens."
# Sentences in the kept language: re-orderings of the corpus's words, not the corpus itself.
IN_LANGUAGE = ["The lazy dog jumps over the quick brown fox.", "Language models predict the next token.",
               "the tokens the fox predict. the dog"]
OUT_OF_CORPUS = ["Caf\u00e9 cr\u00e8me co\u00fbte 12,50 \u20ac", "def f(x):\n    return x * 2", "\U0001f30a zebra!"]


def trim_recipe(tmp_path, corpus_text=KEPT_TEXT, base="fp32", **options):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text)
    passes = load_recipe(base).passes
    recipe = Recipe(f"{base}-trimmed", "", passes).inserting(
        [make_pass({"pass": "trim_vocab", "corpus": str(corpus), **options})], where="earliest")
    path = tmp_path / "trim.json"
    path.write_text(json.dumps(recipe.to_dict()))
    return str(path)


@pytest.fixture(scope="module")
def trimmed(tiny_hf_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trim")
    return onnxlm.optimize(str(tiny_hf_dir), recipe=trim_recipe(tmp), output=tmp / "art")


def report(art) -> dict:
    return next(r for r in art.manifest["passes"] if r["name"] == "trim_vocab")


def logits_of(art, ids):
    session = art.session
    return session.step(np.asarray([ids], np.int64), session.new_cache(1, 64)).copy()[0]


def test_the_kept_language_tokenizes_and_decodes_as_before(trimmed, tiny_artifact):
    check = report(trimmed)["check"]
    kept = check["kept_ids"]
    assert check["vocab_before"] == 320 and check["vocab_after"] == len(kept) < 320
    assert trimmed.info.vocab_size == len(kept) and kept == sorted(kept)
    old, new = tiny_artifact.tokenizer, trimmed.tokenizer
    for text in IN_LANGUAGE:
        old_ids, new_ids = old.encode(text), new.encode(text)
        assert set(old_ids) <= set(kept)  # in the kept language: the corpus's tokens, in another order
        assert [kept[i] for i in new_ids] == old_ids
        assert new.decode(new_ids) == old.decode(old_ids) == text
    # text that needs dropped tokens still encodes (through bytes), into more tokens, and decodes exactly
    dropped = 0
    for text in OUT_OF_CORPUS:
        old_ids, new_ids = old.encode(text), new.encode(text)
        assert new.decode(new_ids) == text and len(new_ids) >= len(old_ids)
        dropped += any(i not in kept for i in old_ids)
    assert dropped and check["oov_rate"] > 0 and check["token_ratio"] > 1


def test_special_tokens_and_generation_ids_are_kept(trimmed, tiny_artifact):
    old, new = tiny_artifact.tokenizer.tokenizer, trimmed.tokenizer.tokenizer
    specials = {t.content for t in old.get_added_tokens_decoder().values()}
    assert specials == {t.content for t in new.get_added_tokens_decoder().values()}
    for token in specials:
        assert new.encode(token).ids == [new.token_to_id(token)]
    assert [new.id_to_token(i) for i in trimmed.info.eos_token_ids] == \
        [old.id_to_token(i) for i in tiny_artifact.info.eos_token_ids]
    if tiny_artifact.info.bos_token_id is not None:
        assert new.id_to_token(trimmed.info.bos_token_id) == old.id_to_token(tiny_artifact.info.bos_token_id)
    genai = json.loads((trimmed.directory / "genai_config.json").read_text())["model"]
    assert genai["vocab_size"] == trimmed.info.vocab_size
    eos = genai["eos_token_id"] if isinstance(genai["eos_token_id"], list) else [genai["eos_token_id"]]
    assert eos == trimmed.info.eos_token_ids and genai["pad_token_id"] == eos[0]
    config = json.loads((trimmed.directory / "tokenizer_config.json").read_text())
    assert config["eos_token"] == old.id_to_token(tiny_artifact.info.eos_token_ids[0])
    assert trimmed.manifest["model"]["vocab_size"] == trimmed.info.vocab_size


def test_the_logits_at_kept_ids_equal_the_untrimmed_models(trimmed, tiny_artifact):
    kept = report(trimmed)["check"]["kept_ids"]
    for text in IN_LANGUAGE:
        old_ids = tiny_artifact.tokenizer.encode(text)
        new_ids = trimmed.tokenizer.encode(text)
        np.testing.assert_array_equal(logits_of(trimmed, new_ids), logits_of(tiny_artifact, old_ids)[:, kept])
    # PPL over the kept tokens: the dropped tokens' probability is renormalized onto them, so it can only fall
    text = " ".join(IN_LANGUAGE)
    assert trimmed.perplexity(text=text)["ppl"] <= tiny_artifact.perplexity(text=text)["ppl"] * (1 + 1e-6)


@pytest.mark.parametrize("variant", ["qwen2-untied", "gemma2-softcap"])
def test_untied_and_soft_capped_heads_are_trimmed(variant, tmp_path):
    hf = write_tiny_llama(tmp_path / "hf", variant=variant)
    full = onnxlm.optimize(str(hf), recipe="fp32", output=tmp_path / "full")
    art = onnxlm.optimize(str(hf), recipe=trim_recipe(tmp_path), output=tmp_path / "trim")
    kept = report(art)["check"]["kept_ids"]
    ids = full.tokenizer.encode(IN_LANGUAGE[0])
    assert [kept[i] for i in art.tokenizer.encode(IN_LANGUAGE[0])] == ids
    np.testing.assert_array_equal(logits_of(art, art.tokenizer.encode(IN_LANGUAGE[0])), logits_of(full, ids)[:, kept])


@pytest.mark.parametrize("source,recipe", [("tiny_hf_dir", "int4-rtn"), ("tiny_q4_gguf", "int4-fast")])
def test_a_trimmed_int4_artifact_builds_with_the_head_shared(source, recipe, request, tmp_path):
    """Quantized heads: trim_vocab runs on the float weights, before the quantizers (its graph forms say so); a
    GGUF's Q8_0 head still matches its rows bit for bit, only fewer of them."""
    model = request.getfixturevalue(source)
    art = onnxlm.optimize(str(model), recipe=trim_recipe(tmp_path, base=recipe), output=tmp_path / "a")
    names = [p["pass"] for p in art.manifest["recipe"]["passes"]]
    assert names.index("trim_vocab") < min(i for i, n in enumerate(names) if n.startswith("quant_"))
    exact = [r for r in art.manifest["passes"] if r["name"] == "quant_gguf_exact"]
    assert not exact or (exact[0]["matched"]["matmul_nbits_q8_0"] == 1 and exact[0]["check"]["weights_bit_identical"])
    assert art.info.vocab_size == report(art)["check"]["vocab_after"]
    assert art.manifest["op_histogram"].get("com.microsoft::GatherBlockQuantized") == 1
    from onnxlm.runtime.decoding import Decoding

    ids = list(art.generate_ids(art.tokenizer.encode(IN_LANGUAGE[0]), 4, ignore_eos=True, decoding=Decoding()))
    assert len(ids) == 4 and all(0 <= i < art.info.vocab_size for i in ids)


def test_the_pass_order_and_options_are_checked_in_one_line(tmp_path):
    trim = make_pass({"pass": "trim_vocab"})
    int4 = load_recipe("int4-rtn")
    with pytest.raises(OnnxlmError, match=r"'trim_vocab' at step 12 needs float weights \(before quantization\), but"):
        Recipe("late", "", [*int4.passes, trim]).checked()
    with pytest.raises(OnnxlmError, match="max_vocab must be >= 0"):
        make_pass({"pass": "trim_vocab", "max_vocab": -1})
    with pytest.raises(OnnxlmError, match="corpus file does not exist"):
        make_pass({"pass": "trim_vocab", "corpus": str(tmp_path / "missing.txt")})


def test_a_cap_below_the_byte_and_special_tokens_is_one_line(tiny_hf_dir, tmp_path):
    with pytest.raises(OnnxlmError, match="max_vocab 100 is below the 259 special and byte tokens"):
        onnxlm.optimize(str(tiny_hf_dir), recipe=trim_recipe(tmp_path, max_vocab=100), output=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_cap_keeps_the_most_frequent_tokens(tiny_hf_dir, tmp_path):
    corpus = " ".join(CORPUS)
    art = onnxlm.optimize(str(tiny_hf_dir), recipe=trim_recipe(tmp_path, corpus, max_vocab=280), output=tmp_path / "a")
    assert report(art)["check"]["vocab_after"] <= 280
    for text in CORPUS:
        assert art.tokenizer.decode(art.tokenizer.encode(text)) == text


def test_a_trimmed_build_resumed_from_the_graph_cache_is_byte_identical(tiny_hf_dir, tmp_path):
    from onnxlm.passes.graph_cache import GraphCache

    recipe = trim_recipe(tmp_path)
    cache = GraphCache(tmp_path / "graphs", (2,))  # after cleanup and trim_vocab
    first = onnxlm.optimize(str(tiny_hf_dir), recipe=recipe, output=tmp_path / "a", graph_cache=cache)
    said = []
    second = onnxlm.optimize(str(tiny_hf_dir), recipe=recipe, output=tmp_path / "b", graph_cache=cache,
                             progress=said.append)
    assert "resuming after 2 pass(es) from the graph cache" in said
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json", "tokenizer_config.json"):
        assert (first.directory / name).read_bytes() == (second.directory / name).read_bytes()


def test_the_cli_option_trims_the_model_and_its_self_draft_alike(tiny_hf_dir, tmp_path, capsys):
    from cli_helpers import run_cli

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(KEPT_TEXT)
    out = tmp_path / "a"
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", out, "--trim-vocab", corpus,
                           "--self-draft-layers", "1")
    assert code == 0, err
    assert "trim_vocab: " in err and "vocabulary 320 -> " in err
    model, draft = (json.loads((d / "manifest.json").read_text())["model"] for d in (out, out / "draft"))
    assert model["vocab_size"] == draft["vocab_size"] < 320
    assert (out / "tokenizer.json").read_bytes() == (out / "draft" / "tokenizer.json").read_bytes()
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", tmp_path / "b", "--recipe", trim_recipe(tmp_path),
                           "--self-draft-layers", "1", "--draft-recipe", "fp32")
    assert code == 2 and "the self-draft must keep the model's vocabulary" in err and not (tmp_path / "b").exists()


def test_a_post_processors_special_tokens_are_kept_and_renumbered(tiny_hf_dir):
    """A tokenizer that adds BOS itself (TemplateProcessing, as Llama's) still adds it, at its new id."""
    import collections

    from tokenizers import Tokenizer, processors

    from onnxlm.model_info import ModelInfo
    from onnxlm.passes.trim_vocab import kept_ids, trimmed_tokenizer

    old = Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))
    old.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    info = ModelInfo("llama", 2, 4, 2, 16, 64, 320, 1024, 1e4, None, [2])
    kept = kept_ids(old, collections.Counter(old.encode("the fox").ids), info, 0)
    new = trimmed_tokenizer(old, kept)
    assert len(kept) < 320 and [kept[i] for i in new.encode("the fox").ids] == old.encode("the fox").ids
    assert new.encode("the fox").tokens[0] == "<|im_start|>"
