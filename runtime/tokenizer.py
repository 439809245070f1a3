"""Text <-> token ids with the `tokenizers` library, and UTF-8-safe streaming of decoded text."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from onnxlm.errors import OnnxlmError
from onnxlm.model_info import ModelInfo
from onnxlm.schema import TOKENIZER_CONFIG, read_json, read_tokenizer


class TextTokenizer:
    def __init__(self, directory: Path, info: ModelInfo):
        self.tokenizer = read_tokenizer(Path(directory) / "tokenizer.json")
        config_path = Path(directory) / "tokenizer_config.json"
        self.config = read_json(config_path, "tokenizer config", TOKENIZER_CONFIG) if config_path.exists() else {}
        self.info = info

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids with no post-processor specials; BOS is prepended only when the model wants it. Text that
        is not valid Unicode (lone surrogates: undecodable bytes on the command line) is one clear error."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OnnxlmError(f"the text is not valid UTF-8 (at character {exc.start})") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        add_bos = self.info.add_bos_token if add_bos is None else add_bos
        if add_bos and self.info.bos_token_id is not None:
            ids = [self.info.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield text pieces as tokens arrive, in O(1) work per token.

        Each step decodes only a short window: the tokens of the last emitted piece (for context) plus the new
        ones. A piece is held back while it ends in U+FFFD, i.e. a multi-byte UTF-8 character split over tokens.
        """
        tokens: list[int] = []
        prefix_start = read_start = 0  # tokens[prefix_start:read_start] were emitted last time
        for token in ids:
            tokens.append(token)
            prefix = self.decode(tokens[prefix_start:read_start])
            text = self.decode(tokens[prefix_start:])
            if text.endswith("\ufffd") or len(text) <= len(prefix):
                continue
            yield text[len(prefix):]
            prefix_start, read_start = read_start, len(tokens)
        tail = self.decode(tokens[prefix_start:])[len(self.decode(tokens[prefix_start:read_start])):]
        if tail:
            yield tail


def cut_at_stop_strings(pieces: Iterable[str], stops: Sequence[str]) -> Iterator[str]:
    """Pass text pieces through until one of `stops` appears; the text from the stop string on is dropped.

    Up to len(longest stop) - 1 characters are held back, since they may be the start of a stop string that
    the next piece completes. Returning early stops the generator that makes the pieces, hence generation."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    hold = max(len(s) for s in stops) - 1
    text = ""
    for piece in pieces:
        text += piece
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            if min(found):
                yield text[: min(found)]
            return
        if len(text) > hold:
            yield text[: len(text) - hold]
            text = text[len(text) - hold :]
    if text:
        yield text
