"""`trim_vocab`: keep the tokens a corpus uses, and shrink the embedding table, the LM head and the tokenizer to them.

After Yamaguchi, Villavicencio and Aletras, "An Empirical Study on Cross-lingual Vocabulary Adaptation for
Efficient Language Model Inference": a model serving one language pays for a head over every language's tokens.

Kept: the tokens the corpus encodes to (option `corpus`, a UTF-8 file; default the calibration text), the added
and special tokens (BOS, EOS), what lets the tokenizer still encode any text (every single-character token: for a
byte-level BPE such as SmolLM2's, its 256 byte tokens; a byte-fallback model's <0xNN> tokens; the unknown token),
and, closed under the merges, every token a merge producing a kept token reads. A merge stays when its parts and
its result are kept. `max_vocab` caps the count: the corpus's tokens join by frequency while they fit.

Kept tokens keep their order: new id i is old id `kept[i]` (the report's `kept_ids`), so the special tokens,
the model's BOS/EOS (ModelInfo, genai_config, tokenizer_config) and the calibration ids are remapped with it.
Guarantees: text whose tokens are all kept tokenizes to the same tokens (BPE applies the same merges: every
merge it applied built a kept token, and the merges it did not apply are still outranked) and decodes to the same
text; the logits at kept ids equal the untrimmed model's. Text that needs a dropped token still encodes, through
the merges and bytes that are left (more tokens): the report's `oov_rate` and `token_ratio` on the calibration
text say how often. PPL over the kept tokens renormalizes the dropped tokens' probability onto them, so it is at
most the untrimmed model's on text without dropped tokens. Needs float weights: it runs before quantization.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxlm.errors import OnnxlmError
from onnxlm.passes.base import FLOAT_WEIGHTS, FOLDED, Pass, PassContext
from onnxlm.passes.quant.linears import HEAD_EPILOGUE, initializer_bytes, lm_head

BYTE_FALLBACK = re.compile(r"<0x[0-9A-F]{2}>")


@dataclasses.dataclass
class TrimVocabOptions:
    corpus: str = ""  # a UTF-8 text file whose tokens are kept; "": the calibration text
    max_vocab: int = 0  # the most tokens kept (0: every token the corpus uses)


class TrimVocab(Pass):
    """Embedding rows, LM head columns and tokenizer entries -> the tokens a corpus uses (plus specials, bytes)."""

    name = "trim_vocab"
    Options = TrimVocabOptions
    lossless = False  # the vocabulary changes: the report carries the PPL before and after
    requires = (FOLDED, FLOAT_WEIGHTS)  # the table and the head as float initializers (before quantization)

    def validate(self) -> None:
        if self.options.max_vocab < 0:
            raise OnnxlmError(f"trim_vocab: max_vocab must be >= 0 (0: no cap), got {self.options.max_vocab}")
        if self.options.corpus and not Path(self.options.corpus).is_file():
            raise OnnxlmError(f"trim_vocab: the corpus file does not exist: {self.options.corpus}")

    def run(self, model, ctx: PassContext):
        from onnxlm.schema import read_text

        if ctx.tokenizer is None:
            raise OnnxlmError("trim_vocab needs the source's tokenizer")
        graph = model.graph
        gather, head, weights = embedding_and_head(graph)
        vocab_size = ctx.info.vocab_size
        corpus = read_text(Path(self.options.corpus)) if self.options.corpus else ctx.calibration_text
        used = collections.Counter(ctx.tokenizer.encode(corpus).ids)
        kept = kept_ids(ctx.tokenizer, used, ctx.info, self.options.max_vocab)
        new_tokenizer = trimmed_tokenizer(ctx.tokenizer, kept)
        bytes_before = initializer_bytes(graph)
        for value, axis in weights:
            trim_initializer(value, kept, axis)
        retarget_logits(graph, head, vocab_size, len(kept))
        new_id = {old: new for new, old in enumerate(kept)}
        old_ids = ctx.calibration_ids
        ctx.info = dataclasses.replace(
            ctx.info, vocab_size=len(kept),
            bos_token_id=None if ctx.info.bos_token_id is None else new_id[ctx.info.bos_token_id],
            eos_token_ids=[new_id[e] for e in ctx.info.eos_token_ids])
        ctx.tokenizer = new_tokenizer
        ctx.calibration_ids = new_tokenizer.encode(ctx.calibration_text).ids if ctx.calibration_text else \
            [new_id[i] for i in old_ids]
        ctx.metrics.update({
            "vocab_before": vocab_size, "vocab_after": len(kept), "corpus_tokens": sum(used.values()),
            "corpus_distinct": len(used), "bytes_before": bytes_before, "bytes_after": initializer_bytes(graph),
            "oov_rate": sum(i not in new_id for i in old_ids) / max(len(old_ids), 1),
            "token_ratio": len(ctx.calibration_ids) / max(len(old_ids), 1),
            "kept_ids": kept,
        })
        notes = [f"vocabulary {vocab_size} -> {len(kept)} tokens ({len(used)} used by the corpus)"]
        if gather is None:
            notes.append("no embedding Gather on input_ids: only the head was trimmed")
        return True, {"tokens_kept": len(kept)}, notes


def embedding_and_head(graph):
    """(embedding Gather or None, LM head MatMul, [(float initializer, vocab axis)]): the weights to trim. The
    tied head reads Transpose(table), the table the Gather reads; an untied head its own [hidden, vocab]."""
    head = lm_head(graph)
    if head is None or head.op_type != "MatMul":
        raise OnnxlmError("trim_vocab needs the LM head as a float MatMul: run it before quantization")
    gather = next((n for n in graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                   and n.inputs[1].name == "input_ids"), None)
    weights = [(gather.inputs[0], 0)] if gather is not None else []
    w = head.inputs[1]
    producer = w.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0].const_value is not None:
        if gather is None or producer.inputs[0] is not gather.inputs[0]:
            weights.append((producer.inputs[0], 0))
        producer.outputs[0].shape = None  # re-derived by ORT from the trimmed table
    elif w.const_value is not None and len(w.const_value.shape) == 2:
        weights.append((w, 1))
    else:
        raise OnnxlmError("trim_vocab needs the LM head's weight as a float initializer: run it before quantization")
    return gather, head, weights


def trim_initializer(value, kept: list[int], axis: int) -> None:
    import onnx_ir as ir

    array = np.ascontiguousarray(np.take(value.const_value.numpy(), kept, axis=axis))
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def retarget_logits(graph, head, vocab: int, kept: int) -> None:
    """The head's output and the family's elementwise epilogue up to `logits` end in `kept`, not `vocab`."""
    import onnx_ir as ir

    value = head.outputs[0]
    while value is not None:
        if value.shape is not None and len(value.shape) and value.shape[-1] == vocab:
            value.shape = ir.Shape([*list(value.shape)[:-1], kept])
        users = [u for u, _ in value.uses() if u.op_type in HEAD_EPILOGUE]
        value = users[0].outputs[0] if value.name != "logits" and len(users) == 1 else None


def kept_ids(tokenizer, used: collections.Counter, info, cap: int) -> list[int]:
    """The old ids kept, sorted: specials, fallback tokens, the corpus's tokens (by frequency while they fit
    under `cap`), closed under the merges that build them."""
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise OnnxlmError(f"trim_vocab supports BPE tokenizers, not {model.get('type')}")
    vocab = model["vocab"]
    if max(vocab.values(), default=0) >= info.vocab_size:
        raise OnnxlmError(f"the tokenizer has ids past the model's vocabulary of {info.vocab_size}")
    token = {i: t for t, i in vocab.items()}
    parts = collections.defaultdict(list)  # token -> the tokens of every merge that makes it
    for a, b in map(merge_pair, model.get("merges", [])):
        parts[merged(a, b, model)].extend((a, b))

    def closure(ids) -> set[int]:
        out, todo = set(), list(ids)
        while todo:
            i = todo.pop()
            if i in out:
                continue
            out.add(i)
            todo.extend(vocab[p] for p in parts.get(token.get(i), ()) if p in vocab)
        return out

    base = {a["id"] for a in data.get("added_tokens", []) if a["id"] < info.vocab_size}
    remapped(data.get("post_processor"), lambda i: base.add(i) or i)  # the ids its templates insert
    base |= {i for i in (info.bos_token_id, *info.eos_token_ids) if i is not None}
    base |= {i for t, i in vocab.items() if len(t) == 1 or BYTE_FALLBACK.fullmatch(t) or t == model.get("unk_token")}
    kept = closure(base)
    if cap and len(kept) > cap:
        raise OnnxlmError(f"trim_vocab: max_vocab {cap} is below the {len(kept)} special and byte tokens")
    for i, _ in sorted(used.items(), key=lambda kv: (-kv[1], kv[0])):
        more = closure([i]) - kept
        if not cap or len(kept) + len(more) <= cap:
            kept |= more
    return sorted(kept)


def merge_pair(merge) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def merged(a: str, b: str, model: dict) -> str:
    prefix = model.get("continuing_subword_prefix") or ""
    return a + (b[len(prefix):] if prefix and b.startswith(prefix) else b)


def trimmed_tokenizer(tokenizer, kept: list[int]):
    """The tokenizer over the kept tokens, renumbered in their order; merges whose parts and result are kept."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.to_str())
    model = data["model"]
    new_id = {old: new for new, old in enumerate(kept)}
    model["vocab"] = {t: new_id[i] for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if i in new_id}
    model["merges"] = [m for m in model.get("merges", [])
                       if all(t in model["vocab"] for t in (*merge_pair(m), merged(*merge_pair(m), model)))]
    data["added_tokens"] = [{**a, "id": new_id[a["id"]]} for a in data.get("added_tokens", []) if a["id"] in new_id]
    data["post_processor"] = remapped(data.get("post_processor"), new_id.__getitem__)
    return Tokenizer.from_str(json.dumps(data))


def remapped(node, new_id: Callable[[int], int]):
    """A post-processor's JSON with `new_id` applied to its special tokens' ids (TemplateProcessing's `ids`, Bert
    and Roberta's [token, id] pairs), in any Sequence."""
    if isinstance(node, list):
        return [remapped(n, new_id) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            out[key] = [new_id(i) for i in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            out[key] = [value[0], new_id(value[1])]
        else:
            out[key] = remapped(value, new_id)
    return out
