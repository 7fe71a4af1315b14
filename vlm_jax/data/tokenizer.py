"""Tokenizers behind one interface: sentencepiece models (load or train) and HF `tokenizer.json` files.

`encode` never adds BOS/EOS (templates place special tokens by id); special-token strings inside the
text are matched as single ids by both backends.
"""
from __future__ import annotations

import io
from collections.abc import Iterable

from vlm_jax.errors import ConfigError
from vlm_jax.paths import user_path, write_atomic

# Where training keeps the tokenizer it trains for embedded tasks (<workdir>/tokenizer.model).
TOKENIZER_FILE = "tokenizer.model"
# Special tokens of tokenizers trained here; user_defined_symbols make each a single id.
IMAGE, BOS, EOS = "<|image|>", "<|begin_of_text|>", "<|end_of_text|>"
USER, ASSISTANT, SYSTEM, EOT, PAD = "<|user|>", "<|assistant|>", "<|system|>", "<|eot|>", "<|pad|>"
SPECIAL_TOKENS = (IMAGE, BOS, EOS, USER, ASSISTANT, SYSTEM, EOT, PAD)

# Checkpoint tokenizers spell the pad token differently; the first one present wins.
_PAD_CANDIDATES = (PAD, "<|finetune_right_pad_id|>", "<pad>", EOS)


class Tokenizer:
    """Common interface. Subclasses set `vocab_size`, implement the four primitives, and call
    `_remember(**init_kwargs)` so the tokenizer pickles (into worker processes) by rebuilding from them."""

    vocab_size: int
    _init_kwargs: dict

    def _remember(self, **init_kwargs):
        self._init_kwargs = init_kwargs

    def __getstate__(self):  # native tokenizer handles do not pickle; their serialized form does
        return self._init_kwargs

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return f"{type(self).__name__}({self._init_kwargs['name']}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        raise NotImplementedError

    def to_tokenizers(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (what an HF tokenizer.json holds): equal ids for every
        text, special tokens as single ids, nothing added around the ids."""
        raise NotImplementedError

    def special_id(self, token: str) -> int:
        """Id of a special token the caller cannot work without; one-line error if absent."""
        token_id = self.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"tokenizer {self} has no token '{token}'; pick a template that matches this "
                             f"tokenizer (data.template) or train one with train_sentencepiece")
        return token_id

    @property
    def image_id(self) -> int:
        return self.special_id(IMAGE)

    @property
    def bos_id(self) -> int:
        return self.special_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def pad_id(self) -> int:
        for token in _PAD_CANDIDATES:
            if (token_id := self.token_to_id(token)) is not None:
                return token_id
        raise ValueError(f"tokenizer {self} has none of the pad tokens {_PAD_CANDIDATES}")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        import sentencepiece as spm
        self._remember(model_proto=model_proto, name=name)
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def save(self, path: str):
        """Writes the model file (local or gs://) through a temporary name."""
        write_atomic(user_path(path, "tokenizer"), self._init_kwargs["model_proto"])

    def to_tokenizers(self):
        """BPE models as train_sentencepiece writes them (no dummy prefix, whitespace kept, digits split)."""
        from sentencepiece import sentencepiece_model_pb2
        from tokenizers import AddedToken, Tokenizer as _Tokenizer, decoders, models, normalizers, pre_tokenizers
        proto = sentencepiece_model_pb2.ModelProto.FromString(self._init_kwargs["model_proto"])
        trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
        supported = (trainer.model_type == trainer.BPE and not normalizer.add_dummy_prefix
                     and not normalizer.remove_extra_whitespaces and trainer.split_by_whitespace)
        if not supported:
            raise ValueError(f"{self}: only BPE sentencepiece models trained by train_sentencepiece convert to "
                             "tokenizer.json; export with the checkpoint's own tokenizer.json")
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        special = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.USER_DEFINED)]
        learned = [piece for piece in vocab if piece not in special]
        # sentencepiece BPE applies the merge whose result scores highest (the earliest piece) first.
        ordinary = set(learned)
        merges = [(piece[:k], piece[k:]) for piece in learned for k in range(1, len(piece))
                  if piece[:k] in ordinary and piece[k:] in ordinary]
        merges.sort(key=lambda m: vocab[m[0] + m[1]])
        backend = _Tokenizer(models.BPE(vocab, merges, unk_token=proto.pieces[trainer.unk_id].piece, fuse_unk=True,
                                        byte_fallback=trainer.byte_fallback))
        if normalizer.precompiled_charsmap:
            backend.normalizer = normalizers.Precompiled(normalizer.precompiled_charsmap)
        splits = [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)]
        if trainer.split_digits:
            splits.append(pre_tokenizers.Digits(individual_digits=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence(splits)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
        return backend


class HFTokenizer(Tokenizer):
    """A `tokenizers` JSON file, e.g. the tokenizer.json shipped with a Llama 3.2 Vision checkpoint."""

    def __init__(self, tokenizer_json: str, name: str = "tokenizer.json"):
        from tokenizers import Tokenizer as _Tokenizer
        self._remember(tokenizer_json=tokenizer_json, name=name)
        self._tok = _Tokenizer.from_str(tokenizer_json)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def to_tokenizers(self):
        from tokenizers import Tokenizer as _Tokenizer
        return _Tokenizer.from_str(self._init_kwargs["tokenizer_json"])


def load_tokenizer(path) -> Tokenizer:
    """A sentencepiece `.model`, an HF `tokenizer.json`, or a folder holding either (local or gs://)."""
    path = user_path(path, "tokenizer")
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "spm.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise ConfigError(f"no tokenizer.json or tokenizer.model in {path}; point data.tokenizer at the file")
    if not path.is_file():
        raise ConfigError(f"tokenizer file not found: {path}; set data.tokenizer to a .model or tokenizer.json")
    if path.name.endswith(".json"):
        try:
            return HFTokenizer(path.read_bytes().decode("utf-8"), name=str(path))
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
            raise ConfigError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0] if str(e) else e!r}); "
                              "point at the checkpoint's tokenizer.json") from None
    try:
        return SentencePieceTokenizer(path.read_bytes(), name=str(path))
    except RuntimeError:
        raise ConfigError(f"{path} is not a sentencepiece model (Llama 3 ships a tiktoken file under that name); "
                          "use the checkpoint's tokenizer.json instead") from None


def check_tokenizer_fits(tokenizer: Tokenizer, model, where: str):
    """The tokenizer's ids are the model's: its <|image|> id is model.image_token_index (images go where the
    model looks for them) and every id has an embedding row (a larger id would be read out of range silently)."""
    if tokenizer.image_id != model.image_token_index:
        raise ConfigError(f"model.image_token_index ({model.image_token_index}) must equal the <|image|> id "
                          f"({tokenizer.image_id}) of the tokenizer {where}; set "
                          f"model.image_token_index={tokenizer.image_id}, or use the model's tokenizer")
    rows = model.text.vocab_size + model.text.extra_embeddings
    if tokenizer.vocab_size > rows:
        raise ConfigError(f"the tokenizer {where} has {tokenizer.vocab_size} tokens, more than the model's {rows} "
                          "embedding rows (model.text.vocab_size + extra_embeddings); use the model's tokenizer")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str | None = None,
                        model_type: str = "bpe", byte_fallback: bool | None = None) -> SentencePieceTokenizer:
    """Trains on `texts` with SPECIAL_TOKENS as single ids (ids 1..8 after <unk>); saves to `path` if given.

    Digits are split into single tokens so numbers are spelled digit by digit; whitespace is kept as is
    so decode(encode(x)) == x. `vocab_size` is an upper bound (small corpora yield fewer pieces).
    byte_fallback (None = auto) spells unseen characters as bytes, but needs 256 byte pieces, so it is on
    only when the vocabulary has room for them besides real pieces (not for the demo's ~100-token vocab).
    """
    if byte_fallback is None:
        byte_fallback = vocab_size >= 1024
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        user_defined_symbols=list(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        byte_fallback=byte_fallback, split_digits=True, character_coverage=1.0, add_dummy_prefix=False,
        remove_extra_whitespaces=False, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    tokenizer = SentencePieceTokenizer(model.getvalue(), name=path or "trained")
    if path:
        tokenizer.save(path)
    return tokenizer
