"""The tokenizer and chat template embedded in an exported GGUF file.

Three sources, best first: the GGUF file the model was loaded from (its ``tokenizer.*`` keys are copied
verbatim, so llama.cpp tokenizes exactly as before); a Hugging Face GPT-2 style BPE tokenizer (through
gguf-py's ``gguf.vocab`` helpers); or, with no usable tokenizer, a placeholder vocabulary of one token per
embedding row (the file runs on token ids; text in and out is meaningless), with a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GGUF_SOURCE_ATTRIBUTE = "gguf_source"
"""Attribute ``loading.load_model`` sets on a model read from a local GGUF file (the file's path)."""


def remember_gguf_source(model: Any, name_or_path: str, gguf_file: str | None = None) -> None:
    """Note on ``model`` the local GGUF file it was read from (embedded name, ``x.gguf``, or dir + gguf_file)."""
    from ..loading import resolve_embedded

    embedded = resolve_embedded(name_or_path) if not os.path.exists(name_or_path) else None
    if embedded is not None:
        name_or_path, gguf_file = embedded[0], gguf_file or embedded[1]
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        path = name_or_path
    elif gguf_file and os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, gguf_file)
    else:
        return
    if os.path.isfile(path):
        setattr(model, GGUF_SOURCE_ATTRIBUTE, os.path.abspath(path))


def source_gguf(model: Any) -> str | None:
    """The local GGUF file the model was loaded from, if it still exists."""
    path = getattr(model, GGUF_SOURCE_ATTRIBUTE, None)
    return path if path and os.path.isfile(path) else None


def add_vocab(writer: Any, vocab_size: int, tokenizer: Any = None, source: str | None = None,
              pre: str | None = None) -> str:
    """Write the tokenizer keys for ``vocab_size`` embedding rows; returns which source was used."""
    if source is not None and _copy_from_gguf(writer, source, vocab_size):
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) and not _has_template(source):
            writer.add_chat_template(tokenizer.chat_template)
        return f"copied from {os.path.basename(source)}"
    if tokenizer is not None and _from_hf_bpe(writer, tokenizer, vocab_size, pre):
        return "Hugging Face BPE tokenizer"
    logger.warning("GGUF export: no GGUF-compatible tokenizer (only GPT-2 style BPE or a source GGUF file are "
                   "written); the file gets a placeholder vocabulary and runs on token ids only")
    _placeholder(writer, vocab_size)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return "placeholder"


def _has_template(path: str) -> bool:
    import gguf

    return "tokenizer.chat_template" in gguf.GGUFReader(path).fields


def _copy_from_gguf(writer: Any, path: str, vocab_size: int) -> bool:
    """Copy every ``tokenizer.*`` key of ``path``; False when its vocabulary size does not match the model."""
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        logger.warning("GGUF export: the tokenizer of %s does not match the model's %d embedding rows; not copied",
                       path, vocab_size)
        return False
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), kind, sub_type=sub)
    return True


def _from_hf_bpe(writer: Any, tokenizer: Any, vocab_size: int, pre: str | None) -> bool:
    """A GPT-2 style byte-level BPE tokenizer through gguf.vocab; False if the tokenizer is of another kind."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    if not hasattr(tokenizer, "save_pretrained"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = BpeVocab(Path(tmp))
        except (FileNotFoundError, ValueError, KeyError, TypeError):  # not a GPT-2 style BPE tokenizer
            return False
        if vocab.vocab_size > vocab_size:
            logger.warning("GGUF export: the tokenizer has %d tokens but the model only %d embedding rows",
                           vocab.vocab_size, vocab_size)
            return False
        tokens, types = [], []
        for text, _score, kind in vocab.all_tokens():
            tokens.append(text if isinstance(text, bytes) else str(text).encode("utf-8"))
            types.append(kind)
        for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        special = SpecialVocab(Path(tmp), load_merges=True, n_vocab=vocab_size)
        if special.chat_template is None and getattr(tokenizer, "chat_template", None):
            special.chat_template = tokenizer.chat_template
        writer.add_tokenizer_model("gpt2")
        if pre is None:
            logger.warning("GGUF export: the pre-tokenizer of a Hugging Face tokenizer is written as 'default'; "
                           "pass gguf_pre_tokenizer= (e.g. 'llama-bpe', 'smollm') to match it exactly")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)
    return True


def _placeholder(writer: Any, vocab_size: int) -> None:
    """One ``<tN>`` token per embedding row (SentencePiece-style), BOS 1 and EOS 2 when they exist."""
    import gguf

    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab_size)
    if vocab_size > 2:
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
