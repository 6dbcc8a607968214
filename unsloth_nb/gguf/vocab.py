"""Tokenizer metadata for GGUF: the ``tokenizer.ggml.*`` keys llama.cpp's converter writes for a model.

Three readers, tried in the order an architecture asks for: SentencePiece (``tokenizer.model``: tokens,
scores, token types), Llama-style HF BPE with byte fallback (gguf-py's ``LlamaHfVocab``) and byte-level BPE
(``gpt2``: tokens, token types, merges and the pre-tokenizer name found by hashing a check text, see
``bpe_pre``); plus two SentencePiece variants: Gemma's (add_space_prefix False) and Phi-3's (its own
added-token rules). Special token ids, add_bos/add_eos and the chat template come from gguf-py's ``SpecialVocab``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from unsloth_nb.checkpoint import SIDE_FILES, read_json
from unsloth_nb.errors import UserError
from unsloth_nb.gguf.bpe_pre import CHECK_TEXT, PRE_BY_HASH

logger = logging.getLogger(__name__)

# SentencePiece token types as llama.cpp numbers them (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


_CACHED_TOKENIZERS = 2
"""Tokenizers whose keys a process keeps (about 40 MB each for a 128k vocabulary): the base and the fine-tune."""
_cache: collections.OrderedDict[str, dict[str, gguf.GGUFValue]] = collections.OrderedDict()
_cache_lock = threading.Lock()
"""Held while a tokenizer's keys are built, so a second caller waits for them instead of building them again."""


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any],
                  order: tuple[str, ...], reads_add_prefix_space: bool) -> None:
    """Write every tokenizer key for the model folder, trying the readers in ``order``.

    The keys are built once per tokenizer in a process and reused (the same files' contents, hparams and
    readers): a 128k vocabulary takes about a second of Python, which every GGUF export of a model, and the
    planner's and picker's exact sizes before it, would otherwise spend again. Arrays are kept as tuples, so
    ``layout.serialize`` can reuse their packed bytes as well."""
    writer.kv_data[0].update(tokenizer_keys(model_dir, hparams, order, reads_add_prefix_space))


def tokenizer_keys(model_dir: Path, hparams: dict[str, Any], order: tuple[str, ...],
                   reads_add_prefix_space: bool) -> dict[str, gguf.GGUFValue]:
    """Every ``tokenizer.ggml.*`` key (and the few others the tokenizer sets) for the folder, in writing order."""
    key = _fingerprint(model_dir, hparams, order, reads_add_prefix_space)
    with _cache_lock:
        if key not in _cache:
            scratch = gguf.GGUFWriter(None, "scratch")
            before = set(scratch.kv_data[0])
            _write_tokenizer(scratch, model_dir, hparams, order, reads_add_prefix_space)
            _cache[key] = {k: gguf.GGUFValue(tuple(v.value) if isinstance(v.value, list) else v.value, v.type,
                                             v.sub_type)
                           for k, v in scratch.kv_data[0].items() if k not in before}
            while len(_cache) > _CACHED_TOKENIZERS:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        return _cache[key]


def _fingerprint(model_dir: Path, hparams: dict[str, Any], order: tuple[str, ...], reads_add_prefix_space: bool) -> str:
    """What the tokenizer keys depend on: the contents of the folder's side files (tokenizer files, config.json),
    the hparams and the readers; a copy of the files elsewhere (a merge's) gives the same fingerprint."""
    settings = {k: v for k, v in hparams.items() if k != "_name_or_path"}  # where the folder is, never read here
    digest = sha256(json.dumps([settings, order, reads_add_prefix_space], sort_keys=True, default=repr).encode())
    for name in SIDE_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any],
                     order: tuple[str, ...], reads_add_prefix_space: bool) -> None:
    config = read_json(model_dir / "tokenizer_config.json")
    if reads_add_prefix_space and (prefix := config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(prefix)
    readers: dict[str, Callable[[], bool]] = {
        "sentencepiece": lambda: _sentencepiece(writer, model_dir, hparams, config),
        "gemma_sentencepiece": lambda: _gemma_sentencepiece(writer, model_dir, hparams, config),
        "phi3": lambda: _phi3(writer, model_dir, hparams, config),
        "llama_hf": lambda: _llama_hf(writer, model_dir),
        "gpt2": lambda: _gpt2(writer, model_dir, hparams),
    }
    for name in order:
        if readers[name]():
            return
    raise UserError(
        f"{model_dir} has no tokenizer that the GGUF writer can read (looked for {', '.join(order)}). Fix: copy "
        "the base model's tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model if any) "
        "into the folder."
    )


def _sentencepiece(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any],
                   config: dict[str, Any]) -> bool:
    """``llama`` vocabulary from tokenizer.model, padded to vocab_size; False when there is no such file."""
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return False
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n_vocab = hparams.get("vocab_size_per_layer_input") or hparams.get("vocab_size") or sp.vocab_size()
    tokens, scores, types = _sentencepiece_pieces(sp, n_vocab, model_dir)
    for key, data in config.get("added_tokens_decoder", {}).items():
        i, text = int(key), data["content"]
        if i >= n_vocab:
            continue
        if data.get("special") or looks_special(text):
            types[i] = _CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = _USER_DEFINED
        scores[i], tokens[i] = -1000.0, text.encode("utf-8")
    _add_llama(writer, model_dir, tokens, scores, types)
    return True


def _gemma_sentencepiece(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any],
                         config: dict[str, Any]) -> bool:
    """Gemma: the SentencePiece vocabulary, then ``add_space_prefix`` False (Gemma adds no leading space)."""
    if not _sentencepiece(writer, model_dir, hparams, config):
        return False
    writer.add_add_space_prefix(False)
    return True


def _phi3(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any], config: dict[str, Any]) -> bool:
    """Phi-3's reader: byte-level BPE when tokenizer_config names GPT2Tokenizer (Phi-4), else tokenizer.model
    padded to vocab_size, with the added tokens of added_tokens.json, then of tokenizer_config.json's
    added_tokens_decoder and tokenizer.json's added_tokens (user-defined, or control when marked special;
    no "looks special" guess, no space normalisation, unlike the Llama reader)."""
    if config.get("tokenizer_class") == "GPT2Tokenizer":
        return _gpt2(writer, model_dir, hparams)
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        return False
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n_vocab = hparams.get("vocab_size") or sp.vocab_size()
    tokens, scores, types = _sentencepiece_pieces(sp, n_vocab, model_dir)
    added = [(int(k), v) for k, v in config.get("added_tokens_decoder", {}).items()]
    added += [(int(v["id"]), v) for v in read_json(model_dir / "tokenizer.json").get("added_tokens", [])]
    for i, data in added:
        if i < n_vocab:
            tokens[i], scores[i] = data["content"].encode("utf-8"), -1000.0
            types[i] = _CONTROL if data.get("special") else _USER_DEFINED
    _add_llama(writer, model_dir, tokens, scores, types)
    return True


def _sentencepiece_pieces(sp: Any, n_vocab: int, model_dir: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and types of a SentencePiece model, padded with ``[PADi]`` (unused) to ``n_vocab``, with
    the folder's added_tokens.json entries as user-defined tokens."""
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [_UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (_UNKNOWN if sp.IsUnknown(i) else _CONTROL if sp.IsControl(i) else _UNUSED if sp.IsUnused(i)
                    else _BYTE if sp.IsByte(i) else _NORMAL)
    for text, i in read_json(model_dir / "added_tokens.json").items():
        if i < n_vocab:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, _USER_DEFINED
    return tokens, scores, types


def _add_llama(writer: gguf.GGUFWriter, model_dir: Path, tokens: list, scores: list, types: list) -> None:
    """The ``llama`` tokenizer keys: model, pre-tokenizer, tokens, scores, types and the special tokens."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _special_vocab(model_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _llama_hf(writer: gguf.GGUFWriter, model_dir: Path) -> bool:
    """``llama`` vocabulary from a Llama-style tokenizer.json (BPE with byte fallback); False if not one."""
    tokenizer = read_json(model_dir / "tokenizer.json")
    model = tokenizer.get("model") or {}
    if (model.get("type") != "BPE" or not model.get("byte_fallback", False)
            or (tokenizer.get("decoder") or {}).get("type") != "Sequence"):
        return False  # what gguf-py's LlamaHfVocab refuses, checked without parsing the file again
    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except (FileNotFoundError, TypeError):
        return False
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(toktype)
    _add_llama(writer, model_dir, tokens, scores, types)
    return True


def _gpt2(writer: gguf.GGUFWriter, model_dir: Path, hparams: dict[str, Any]) -> bool:
    """``gpt2`` byte-level BPE vocabulary, read as llama.cpp's converter reads it through AutoTokenizer."""
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        return False
    tokenizer = _FastBpe.load(model_dir) or _HfBpe(model_dir)
    vocab = tokenizer.vocab
    n_vocab = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= n_vocab:
        raise UserError(
            f"The tokenizer in {model_dir} has ids up to {max(vocab.values())} but config.json says vocab_size "
            f"{n_vocab}. Fix: use the tokenizer files that belong to this model."
        )
    pre = tokenizer.pre or pre_tokenizer_name(tokenizer.ids(CHECK_TEXT))
    by_id = {i: text for text, i in vocab.items()}
    added = tokenizer.added
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        text = by_id[i]
        if i in added:
            special, normalized = added[i]
            if not normalized:
                text = tokenizer.round_trip(text)
            if special or looks_special(text):
                types.append(_CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(_USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(text)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _special_vocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    return True


class _HfBpe:
    """A BPE tokenizer through transformers' AutoTokenizer, exactly what llama.cpp's converter reads."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab: dict[str, int] = self.tokenizer.vocab
        added_vocab = self.tokenizer.get_added_vocab()
        self.added = {i: (t.special, t.normalized) for i, t in self.tokenizer.added_tokens_decoder.items()
                      if t.content in added_vocab}
        self.pre: str | None = None

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def round_trip(self, text: str) -> str:
        return self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False))


# What transformers' decode rewrites (clean_up_tokenization) and the tokenizers library's does not.
_CLEANED_UP = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")


class _FastBpe:
    """The same reads straight from tokenizer.json with the tokenizers library, about 3x faster to load than
    AutoTokenizer (most of a 128k-vocabulary conversion's set-up). Used only where it provably gives
    AutoTokenizer's answers: the check text's ids hash to a pre-tokenizer llama.cpp knows, the added tokens
    agree with tokenizer_config.json, and no added token needs transformers' decode clean-up."""

    def __init__(self, tokenizer: Any, pre: str) -> None:
        self.tokenizer = tokenizer
        self.pre = pre
        self.vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
        self.decoder = tokenizer.get_added_tokens_decoder()
        self.added = {i: (t.special, t.normalized) for i, t in self.decoder.items()}

    @classmethod
    def load(cls, model_dir: Path) -> _FastBpe | None:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path))
        except Exception:  # a file only transformers can load: let it report the problem
            return None
        pre = PRE_BY_HASH.get(_ids_digest(tokenizer.encode(CHECK_TEXT).ids))
        if pre is None:
            return None
        fast = cls(tokenizer, pre)
        declared = read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, entry in declared.items():
            token = fast.decoder.get(int(key)) if key.isdigit() else None
            if token is None or token.content != entry.get("content") or token.special != entry.get("special"):
                return None
        for i, (_, normalized) in fast.added.items():
            text = fast.decoder[i].content
            if not normalized and (fast.round_trip(text) != text or any(p in text for p in _CLEANED_UP)):
                return None
        return fast

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def round_trip(self, text: str) -> str:
        return self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False).ids,
                                     skip_special_tokens=False)


def _ids_digest(ids: list[int]) -> str:
    return sha256(str(ids).encode()).hexdigest()


def pre_tokenizer_name(ids: list[int]) -> str:
    """llama.cpp's name for a BPE pre-tokenizer, from the check text's ids; "default" when unknown."""
    digest = _ids_digest(ids)
    name = PRE_BY_HASH.get(digest)
    if name is None:
        logger.warning(
            "\n" + "*" * 100 + "\n** WARNING: this BPE pre-tokenizer is not one llama.cpp knows (check-text hash "
            f"{digest}).\n** It is written as 'default': llama.cpp will split text differently from the HF "
            "tokenizer and\n** generation quality may suffer. llama.cpp's own converter refuses such a model.\n"
            + "*" * 100
        )
        return "default"
    return name


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp treats as control tokens even when not marked special (``<|...|>`` and a few)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _special_vocab(model_dir: Path, *, load_merges: bool, n_vocab: int | None = None) -> gguf.SpecialVocab:
    """gguf-py's SpecialVocab, with the newer llama.cpp rules for add_bos/add_eos and normalizer flags."""
    tokenizer = read_json(model_dir / "tokenizer.json")
    merges = _merges(tokenizer) if load_merges else None
    # gguf-py warns "Unknown separator token" for the pair template of Llama 2/3 tokenizers, which only
    # matters for sentence-pair tasks; keep it out of users' notebooks.
    gguf_logger = logging.getLogger("gguf.vocab")
    level = gguf_logger.level
    gguf_logger.setLevel(logging.ERROR)
    config = read_json(model_dir / "tokenizer_config.json")
    flags, named = _post_processor(tokenizer, config)
    try:
        with _small_tokenizer_json(model_dir, tokenizer, load_merges and merges is None,
                                   {**config, **named} if named else None) as folder:
            special = gguf.SpecialVocab(folder, load_merges=load_merges and merges is None, n_vocab=n_vocab)
    finally:
        gguf_logger.setLevel(level)
    if merges is not None:
        special.merges = merges
    special.add_special_token.update(flags)
    lowercase, strip_accents = _normalizer_flags(tokenizer.get("normalizer") or {})
    special.normalizer_flags = {"tokenizer.ggml.normalizer_lowercase": lowercase,
                                "tokenizer.ggml.normalizer_strip_accents": strip_accents}
    return _SpecialVocabWithNormalizer(special)


_MERGE_SPACE = "\u0120"
"""How gguf-py writes a space inside one part of a merge (the space itself separates the two parts)."""


def _merges(tokenizer: dict[str, Any]) -> list[str] | None:
    """tokenizer.json's BPE merges as gguf-py writes them ("a b", a space inside a part written as U+0120);
    None where there are none or their format is one only gguf-py should judge."""
    merges = (tokenizer.get("model") or {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        return [" ".join([part.replace(" ", _MERGE_SPACE) for part in pair]) for pair in merges]
    return None


@contextlib.contextmanager
def _small_tokenizer_json(model_dir: Path, tokenizer: dict[str, Any], needs_model: bool,
                          config: dict[str, Any] | None = None) -> Iterator[Path]:
    """``model_dir`` as SpecialVocab should see it: the same files, but tokenizer.json without its "model"
    section (the vocabulary and merges, nearly all of a 128k-token file, which SpecialVocab would parse a
    second time when it only needs the added tokens and post-processor), and tokenizer_config.json replaced by
    ``config`` when given. The real folder where the merges must come from SpecialVocab itself (and nothing is
    replaced), or where links cannot be made."""
    if (needs_model and config is None) or not tokenizer:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="unsloth_nb-vocab-") as tmp:
        folder = Path(tmp)
        try:
            for entry in model_dir.iterdir():
                if entry.name not in ("tokenizer.json", "tokenizer_config.json"):
                    (folder / entry.name).symlink_to(entry.resolve())
            small = tokenizer if needs_model else {key: value for key, value in tokenizer.items() if key != "model"}
            (folder / "tokenizer.json").write_text(json.dumps(small), encoding="utf-8")
            if config is not None:
                (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
            elif (model_dir / "tokenizer_config.json").is_file():
                (folder / "tokenizer_config.json").symlink_to((model_dir / "tokenizer_config.json").resolve())
        except OSError:  # no symlinks (some Windows setups): read the real folder
            folder = model_dir
        yield folder


def _post_processor(tokenizer: dict[str, Any], config: dict[str, Any]) -> tuple[dict[str, bool], dict[str, str]]:
    """What llama.cpp's converter derives from tokenizer.json's post-processor beyond what gguf-py 0.19 does:
    the add_bos/add_eos/add_sep flags (they win over tokenizer_config.json's add_*_token; a byte-level
    post-processor alone means neither is added), and the special tokens it names when tokenizer_config.json
    does not: a template's leading token becomes the BOS (or CLS) token. Returns (flags, tokenizer_config
    entries to add)."""
    flags: dict[str, bool] = {}
    named: dict[str, str] = {}
    post = tokenizer.get("post_processor") or {}
    bos, cls = config.get("bos_token"), config.get("cls_token")
    if not bos and cls and config:
        bos = cls
    for processor in post.get("processors", [post]) if post else []:
        kind = processor.get("type")
        if kind == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            flags.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = processor.get("single", [])
            if len(single) > 1:
                if first := single[0].get("SpecialToken", {}).get("id"):
                    if not config:
                        bos = first
                    elif first not in (bos, cls):
                        if not bos:
                            named["bos_token"] = bos = first
                        if not cls:
                            named["cls_token"] = cls = first
                    flags["bos"] = first in (bos, cls)
                if single[-1].get("SpecialToken", {}).get("id"):
                    flags["eos"] = True
    return flags, named


def _normalizer_flags(normalizer: dict[str, Any]) -> tuple[bool | None, bool | None]:
    """(lowercase, strip_accents) from a tokenizers normalizer description."""
    lowercase = strip = None
    kind = normalizer.get("type")
    if kind == "Lowercase":
        lowercase = True
    elif kind == "StripAccents":
        strip = True
    elif kind == "BertNormalizer":
        lowercase = normalizer.get("lowercase")
        strip = normalizer.get("strip_accents")
    elif kind == "Sequence":
        for inner in normalizer.get("normalizers", []):
            low, acc = _normalizer_flags(inner)
            lowercase = low if low is not None else lowercase
            strip = acc if acc is not None else strip
    return lowercase, strip


class _SpecialVocabWithNormalizer:
    """Writes a SpecialVocab, then the normalizer flags (keys PyPI gguf 0.19 has no helper for)."""

    def __init__(self, special: gguf.SpecialVocab) -> None:
        self.special = special

    def add_to_gguf(self, writer: gguf.GGUFWriter, quiet: bool = False) -> None:
        self.special.add_to_gguf(writer, quiet=quiet)
        for key, value in self.special.normalizer_flags.items():
            if value is not None:
                writer.add_bool(key, value)
