"""The tokenizer of a language-model GGUF, through the `tokenizers` library.

Our files carry the original tokenizer.json (`tokenizer.huggingface.json`); files made by
llama.cpp's converter do not, so the tokenizer is rebuilt from `tokenizer.ggml.*`: the BPE
vocabulary and merges, the added tokens by their ggml token type, and the pre-tokenizer that
`tokenizer.ggml.pre` names (DeepSeek-OCR's is llama.cpp's `deepseek-v3`).
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from tokenizers.decoders import DecodeStream

from dsocr.runtime.errors import ModelError
from dsocr.runtime.gguf_file import GGUFFile

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied in sequence, each isolating its matches
PRE_TOKENIZER_REGEXES = {
    "deepseek-v3": [
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ],
    "gpt2": None,   # the byte-level pre-tokenizer's own regex
}


def tokenizer_from_ggml(tokens: list[str], types: list[int], merges: list[str], pre: str) -> Tokenizer:
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ModelError(f"tokenizer pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZER_REGEXES)})")
    # every real token keeps its id in the BPE vocabulary; added tokens are then registered
    # (reusing those ids) so they are matched whole before BPE runs
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != TokenType.UNUSED}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    regexes = PRE_TOKENIZER_REGEXES[pre]
    if regexes is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=(ty == TokenType.CONTROL), normalized=False)
             for t, ty in zip(tokens, types) if ty in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tok.add_tokens(added)
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TokenType.CONTROL, TokenType.USER_DEFINED) and tok.token_to_id(t) != i:
            raise ModelError(f"tokenizer: added token {t!r} would not get its id {i}")
    return tok


@dataclass
class TextTokenizer:
    tok: Tokenizer
    bos_id: int
    eos_id: int
    source: str      # "tokenizer.huggingface.json" or "tokenizer.ggml"

    @classmethod
    def from_gguf(cls, f: GGUFFile, prefer_hf_json: bool = True) -> TextTokenizer:
        hf = f.get("tokenizer.huggingface.json") if prefer_hf_json else None
        if hf:
            tok, source = Tokenizer.from_str(hf), "tokenizer.huggingface.json"
        else:
            tokens = f.require("tokenizer.ggml.tokens")
            types = f.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
            tok = tokenizer_from_ggml(tokens, types, f.require("tokenizer.ggml.merges"),
                                      f.get("tokenizer.ggml.pre", "gpt2"))
            source = "tokenizer.ggml"
        return cls(tok, int(f.get("tokenizer.ggml.bos_token_id", 0)), int(f.get("tokenizer.ggml.eos_token_id", 1)),
                   source)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings included, without bos/eos."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ModelError(f"the tokenizer has no token {token!r}")
        return i

    def text_stream(self) -> TextStream:
        return TextStream(self)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class TextStream:
    """Generated ids -> text deltas that never split a UTF-8 character (tokenizers' DecodeStream
    holds back bytes that do not decode yet). flush() releases what a held-back tail decodes to
    (U+FFFD for an incomplete character), so the deltas always add up to decode(ids)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._stream = DecodeStream(skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        delta = self._stream.step(self.tokenizer.tok, token_id) or ""
        self.text += delta
        return delta

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids)
        tail = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += tail
        return tail
