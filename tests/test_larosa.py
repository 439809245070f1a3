"""La RoSA (`rotate_residual`, `topk_sparsify`) on the tiny llama's artifacts given random norm weights: the rotation
is lossless on the plain and the fused graph (the manager's check, and on real text), the top-k keeps k entries
per token in decode and nothing changes in prefill unless `sparsify_all_positions` is on, prefill with the switch
equals token-by-token decoding, the reported PPL and bytes are what they claim, and the recipes load."""

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import pytest

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import PassContext
from onnxlm.passes.constants import add_initializer
from onnxlm.passes.evaluate import feeds_for, open_session, session_perplexity
from onnxlm.passes.larosa.recipe import with_sparsity
from onnxlm.passes.larosa.sparsify import SWITCH, TopkSparsify, keep_count
from onnxlm.passes.decoder_structure import find_decoder
from onnxlm.passes.manager import run_pipeline
from onnxlm.passes.recipe import Recipe, load_recipe
from onnxlm.passes.registry import make_pass

LAYERS = 2  # conftest's tiny llama: hidden 64, intermediate 128, 4 query heads / 2 KV heads of 16
TEXT = "The quick brown fox jumps over the lazy dog. In 2007, version 3 of the license was published."


@pytest.fixture(scope="module")
def tiny(tiny_artifacts):
    """The tiny model's facts and tokenizer, and recipe -> its artifact graph with a random gamma in every norm
    (HF's all-ones gammas would hide a wrong fold)."""
    import onnx_ir as ir

    arts = {recipe: tiny_artifacts(recipe) for recipe in ("fp32-plain", "fp32")}
    graphs = {}
    for recipe, art in arts.items():
        model = ir.load(art.directory / "model.onnx")
        decoder = find_decoder(model.graph, art.info)
        rng = np.random.default_rng(len(graphs))
        for i, norm in enumerate([b.norm for b in decoder.blocks] + [decoder.final_norm]):
            gamma = rng.uniform(0.5, 1.5, art.info.hidden_size).astype(np.float32)
            norm.node.replace_input_with(norm.gamma_index, add_initializer(model.graph, f"test.gamma_{i}", gamma))
        graphs[recipe] = model
    art = arts["fp32"]
    return dataclasses.make_dataclass("Tiny", ["info", "encode", "graphs"])(
        art.info, lambda text: art.tokenizer.encode(text, add_bos=False), graphs)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def context(tiny, scratch) -> PassContext:
    from onnxlm.api import CALIBRATION_TEXT

    return PassContext(info=tiny.info, source={}, scratch=Path(tempfile.mkdtemp(dir=scratch)),
                       calibration_ids=tiny.encode(CALIBRATION_TEXT.read_text())[:1024])


@pytest.fixture(scope="module")
def rotated(tiny, scratch):
    """recipe -> (rotated model, its pass reports), through the pass manager, built on first use."""
    cache = {}

    def get(recipe):
        if recipe not in cache:
            model = tiny.graphs[recipe].clone()
            reports = run_pipeline(model, Recipe("t", "", [make_pass({"pass": "rotate_residual"})]),
                                   context(tiny, scratch))
            cache[recipe] = model, reports
        return cache[recipe]

    return get


def session_of(model, scratch, name: str, outputs=()):
    """An ORT session of `model` with the values `outputs` also exposed as graph outputs."""
    import onnx_ir as ir

    model = model.clone()
    values = {v.name: v for node in model.graph.all_nodes() for v in node.outputs}
    model.graph.outputs.extend(values[n] for n in outputs)
    path = Path(scratch) / f"{name}.onnx"
    ir.save(model, path, external_data=f"{name}.onnx.data")
    return open_session(path)


def topk_sites(model) -> list[tuple]:
    """(If node, its input x, share of s) per top-k site; share 1.2 where the reader's output joins the stream."""
    sites = []
    for node in model.graph:
        if node.op_type != "If":
            continue
        x = next(iter(node.attributes["else_branch"].as_graph())).inputs[0]  # Identity(x): the dense branch
        readers = [u.node for u in node.outputs[0].uses()]
        joins = {u.node.op_type for r in readers for u in r.outputs[0].uses()}
        sites.append((node, x, 1.2 if joins & {"Add", "SkipSimplifiedLayerNormalization"} else 0.8))
    return sites


def logits_of(session, info, ids, extra=None) -> np.ndarray:
    extra = extra or {}
    feeds = feeds_for(session, info, np.asarray([ids], np.int64), 0, None, set(extra))
    return session.run(["logits"], {**feeds, **extra})[0][0]  # (seq, vocab)


@pytest.mark.parametrize("recipe", ["fp32-plain", "fp32"])
def test_rotation_is_lossless(recipe, rotated, tiny, scratch):
    model, reports = rotated(recipe)
    check = reports[-1].check
    assert reports[-1].name == "rotate_residual" and check["max_abs_logit_diff"] <= 1e-4
    assert reports[-1].matched == {"layers_rotated": LAYERS, "adapters": LAYERS - 1}
    # Independently of the manager's probe: real text, against the unrotated graph (random gammas: the fold counts).
    ids = tiny.encode(TEXT)
    before = logits_of(session_of(tiny.graphs[recipe], scratch, f"unrot-{recipe}"), tiny.info, ids)
    ours = logits_of(session_of(model, scratch, f"rot-{recipe}"), tiny.info, ids)
    np.testing.assert_allclose(ours, before, atol=1e-4)
    graph = model.graph
    decoder = find_decoder(graph, tiny.info)
    assert decoder.fused == (recipe == "fp32")
    assert sum(b.adapter is not None for b in decoder.blocks) == LAYERS - 1
    for norm in [b.norm for b in decoder.blocks] + [decoder.final_norm]:  # every gamma folded out
        assert norm.node is None or np.all(norm.node.inputs[norm.gamma_index].const_value.numpy() == 1)
    table = decoder.embedding.inputs[0]
    head = decoder.head.inputs[1]
    assert head.const_value is not None and head is not table  # untied
    # The stream really is rotated: the embedding rows are no longer the model's.
    original = find_decoder(tiny.graphs[recipe].graph, tiny.info).embedding.inputs[0].const_value.numpy()
    assert not np.allclose(table.const_value.numpy(), original, atol=1e-3)


def test_topk_keeps_k_per_token_in_decode_only(rotated, tiny, scratch):
    base, _ = rotated("fp32")
    model = base.clone()
    ctx = context(tiny, scratch)
    TopkSparsify(sparsity=0.4).run(model, ctx)
    ordered = topk_sites(model)
    assert len(ordered) == 4 * LAYERS  # qkv, o_proj, gate/up, down inputs
    assert sorted(share for _, _, share in ordered) == [0.8] * 2 * LAYERS + [1.2] * 2 * LAYERS
    widths = [n.outputs[0].uses()[0].node.inputs[1].shape[0] for n, _, _ in ordered]  # the reader's K
    shares = [share for _, _, share in ordered]
    names = [n.outputs[0].name for n, _, _ in ordered] + [x.name for _, x, _ in ordered]
    sparse = session_of(model, scratch, "sparse", names)
    dense = session_of(base, scratch, "dense")
    ids = tiny.encode(TEXT)[:6]
    info = tiny.info
    outputs = [o.name for o in sparse.get_outputs()]
    assert SWITCH not in {i.name for i in sparse.get_inputs()}  # a default: callers need not feed it
    assert SWITCH in {i.name for i in sparse.get_overridable_initializers()}

    def run(tokens, start, past, switch=None):
        feeds = feeds_for(sparse, info, np.asarray([tokens], np.int64), start, past)
        if switch is not None:
            feeds[SWITCH] = np.array(switch)
        return dict(zip(outputs, sparse.run(outputs, feeds)))

    def assert_topk(result, site, k):
        """Site output = its input with all but the k largest |x| per token zeroed (ties at the k-th kept)."""
        x = result[names[len(ordered) + site]].reshape(-1, widths[site])  # (tokens, width)
        y = result[names[site]].reshape(x.shape)
        kth = np.sort(np.abs(x), axis=-1)[:, -k][:, None]  # (tokens, 1)
        np.testing.assert_array_equal(y, np.where(np.abs(x) >= kth, x, 0))
        ties = (np.abs(x) == kth).sum(-1) > 1  # GQA heads sharing a KV head give equal o_proj inputs at t=0
        kept = (y != 0).sum(-1)
        assert np.all(kept[~ties] == k) and np.all(kept >= k)

    # Prefill, switch off: every site passes its input on, and the logits are the dense graph's.
    prefill = run(ids, 0, None)
    for site in range(len(ordered)):
        np.testing.assert_array_equal(prefill[names[site]], prefill[names[len(ordered) + site]])
    np.testing.assert_allclose(prefill["logits"][0], logits_of(dense, info, ids), atol=1e-5)
    # Decode, token by token: the k largest entries per token at each site, the rest zero.
    past, decoded = None, []
    for t, token in enumerate(ids):
        step = run([token], t, past)
        past = {n.replace("present.", "past_key_values."): v for n, v in step.items() if n.startswith("present.")}
        decoded.append(step["logits"][0, 0])
        for site in range(len(ordered)):
            assert_topk(step, site, keep_count(widths[site], shares[site] * 0.4))
    # Prefill with the switch on: top-k at every position, and the logits decoding gives, position by position.
    everywhere = run(ids, 0, None, switch=True)
    for site in range(len(ordered)):
        assert_topk(everywhere, site, keep_count(widths[site], shares[site] * 0.4))
    np.testing.assert_allclose(everywhere["logits"][0], np.stack(decoded), atol=1e-4)
    assert not np.allclose(everywhere["logits"][0], prefill["logits"][0], atol=1e-3)


def test_reported_cost_is_what_it_claims(rotated, tiny, scratch):
    base, _ = rotated("fp32-plain")
    ctx = context(tiny, scratch)
    ids = tiny.encode(TEXT * 4)
    deviations, reports = [], {}
    dense = logits_of(session_of(base, scratch, "plain-dense"), tiny.info, ids)
    for s in (0.1, 0.4, 0.7):
        model = base.clone()
        ctx.metrics = {}
        TopkSparsify(sparsity=s).run(model, ctx)
        reports[s] = dict(ctx.metrics)
        session = session_of(model, scratch, f"plain-s{s}")
        on = {SWITCH: np.array(True)}
        deviations.append(float(np.abs(logits_of(session, tiny.info, ids, on) - dense).max()))
        # ppl_after is the PPL with every position sparse, over the calibration text.
        assert reports[s]["ppl_after"] == pytest.approx(session_perplexity(session, tiny.info, ctx.calibration_ids,
                                                                           extra=on), rel=1e-6)
        assert session_perplexity(session, tiny.info, ctx.calibration_ids[:200]) == pytest.approx(
            session_perplexity(open_session(Path(scratch) / "plain-dense.onnx"), tiny.info,
                               ctx.calibration_ids[:200]), rel=1e-5)  # switch off: prefill is dense
    assert deviations[0] < deviations[1] < deviations[2]
    # Bytes per decode token: the rows of the kept entries; the head, the adapters and an embedding row dense.
    d, inter, vocab = tiny.info.hidden_size, 128, tiny.info.vocab_size
    q, kv = 4 * 16, 2 * 2 * 16
    layer = {"qkv": d * (q + kv), "o": q * d, "gate_up": d * 2 * inter, "down": inter * d}
    for s, r in reports.items():
        kept = lambda width, share: keep_count(width, share * s) / width  # noqa: E731
        b = r["weight_bytes_per_token"]
        assert b["adapters"] == (LAYERS - 1) * d * d * 4 and b["lm_head"] == vocab * d * 4
        assert b["dense"] == LAYERS * sum(layer.values()) * 4 + b["adapters"] + b["lm_head"] + d * 4
        per_layer = (layer["qkv"] * kept(d, 0.8) + layer["o"] * kept(q, 1.2) + layer["gate_up"] * kept(d, 0.8)
                     + layer["down"] * kept(inter, 1.2))
        assert b["sparse"] == pytest.approx(LAYERS * per_layer * 4 + b["adapters"] + b["lm_head"] + d * 4, abs=1)


def test_recipes_and_options():
    for name, sparsity in (("larosa-rotate", None), ("larosa-s25", 0.25), ("larosa-s40", 0.40)):
        recipe = load_recipe(name)
        names = [p.name for p in recipe.passes]
        lowering = [p.name for p in load_recipe("fp32").passes][:-1]  # fp32's passes before its logits_to_keep
        assert names[:len(lowering)] == lowering and names[-1] == "logits_to_keep"
        assert "rotate_residual" in names
        topk = [p for p in recipe.passes if p.name == "topk_sparsify"]
        assert [p.options.sparsity for p in topk] == ([] if sparsity is None else [sparsity])
        assert recipe.passes[names.index("rotate_residual")].lossless
    for bad in (0.0, 0.9, -0.1):
        with pytest.raises(OnnxlmError, match="sparsity"):
            make_pass({"pass": "topk_sparsify", "sparsity": bad})
    with pytest.raises(OnnxlmError, match="damping"):
        make_pass({"pass": "rotate_residual", "damping": 0.0})
    assert dataclasses.asdict(make_pass({"pass": "topk_sparsify"}).options) == {"sparsity": 0.25}
    # --sparsity S on any recipe: both passes before the first quantizing pass (or logits_to_keep); a sparsifying
    # recipe is re-set.
    int4 = with_sparsity(load_recipe("int4"), 0.3)
    names = [p.name for p in int4.passes]
    assert names[names.index("cleanup", 1) + 1:names.index("quant_gguf_exact")] == ["rotate_residual", "topk_sparsify"]
    assert [p.name for p in with_sparsity(load_recipe("fp32-plain"), 0.3).passes][-3:] == [*names[8:10], "logits_to_keep"]
    assert [p.options.sparsity for p in with_sparsity(load_recipe("larosa-s25"), 0.4).passes
            if p.name == "topk_sparsify"] == [0.4]
    assert with_sparsity(load_recipe("fp32"), None).pipeline() == load_recipe("fp32").pipeline()


def test_refuses_what_it_cannot_rotate(rotated, tiny, scratch):
    model, _ = rotated("fp32")
    with pytest.raises(OnnxlmError, match="already rotated"):
        make_pass({"pass": "rotate_residual"}).run(model.clone(), context(tiny, scratch))


def test_optimize_sparsity_and_eval_score_the_sparse_path(tiny_hf_dir, tmp_path, capsys):
    from cli_helpers import run_cli
    from onnxlm.api import load

    out = tmp_path / "s30"
    code, _, err = run_cli(capsys, "optimize", tiny_hf_dir, "-o", out, "--sparsity", "0.3")
    assert code == 0, err
    art = load(out)
    names = [r["name"] for r in art.manifest["passes"]]
    assert names[-3:] == ["rotate_residual", "topk_sparsify", "logits_to_keep"] and art.session.interface.has("score_as_decoded")
    ids = art.tokenizer.encode(TEXT * 6, add_bos=False)
    session = open_session(out / "model.onnx")
    sparse = session_perplexity(session, art.info, ids, window=64, extra={SWITCH: np.array(True)})
    dense = session_perplexity(session, art.info, ids, window=64)
    assert sparse != pytest.approx(dense, rel=1e-4)
    assert art.perplexity(text=TEXT * 6, window=64)["ppl"] == pytest.approx(sparse, rel=1e-5)  # eval: sparse path
