"""Text sources shared by calibration and evaluation: files, strings, ``datasets`` objects, Hub dataset names.

A name ("wikitext2", "c4", "fineweb-edu") is read with ``datasets`` and needs the Hub; everything
else works offline. Tokenization happens once over the whole text, without truncation.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _logger() -> Any:
    """transformers' logger, imported on first use so that the CLI parser needs neither torch nor transformers."""
    from transformers.utils import logging

    return logging.get_logger(__name__)

# Short dataset names for ``read_text``: (path, config name, extra load_dataset kwargs, split aliases).
DATASETS: dict[str, tuple[str, str | None, dict[str, Any], dict[str, str]]] = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", {}, {}),
    "c4": ("allenai/c4", None,
           {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",
                           "validation": "en/c4-validation.00000-of-00008.json.gz"}, "streaming": True},
           {"test": "validation", "valid": "validation"}),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", {"streaming": True},
                    {"test": "train", "validation": "train", "valid": "train"}),
}
# Streaming datasets are cut after this many documents (fineweb-edu's sample is 10B tokens).
MAX_STREAMED_DOCUMENTS = 2000
# Slow (Python) tokenizers get the text in pieces of about this many characters.
_SLOW_TOKENIZER_CHUNK = 100_000


class TextFileError(ValueError):
    """A text file that holds no usable text (empty, binary, not UTF-8); the message names the file."""


def _read_file(path: Any, strip_bom: bool) -> str:
    """The file's UTF-8 text; an empty or binary file raises TextFileError naming it and what is expected."""
    expected = "expected a plain UTF-8 text file (e.g. wikitext-2/train.txt)"
    try:
        with open(path, encoding="utf-8-sig" if strip_bom else "utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise TextFileError(f"{os.fspath(path)} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                            f"{err.start}; a binary file?): {expected}") from None
    if "\x00" in text:
        raise TextFileError(f"{os.fspath(path)} holds NUL bytes (a binary file?): {expected}")
    if not text.strip():
        raise TextFileError(f"{os.fspath(path)} is empty{' (only whitespace)' if text else ''}: {expected}")
    return text


class DatasetUnavailableError(RuntimeError):
    """A dataset given by name could not be loaded (usually: no internet); pass a local text file."""


_hub_down: str | None = None
"""Why the Hub was found unreachable in this process (then it is not asked again: no retries per call)."""


def hub_problem() -> str | None:
    """Why the Hub cannot be reached now (offline mode, no route to its endpoint), or None (one 3 s probe)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as err:
        return f"{url.hostname} is unreachable ({type(err).__name__}: {err})"
    return None


def hub_unreachable() -> str | None:
    """``hub_problem()``, decided once per process (datasets are then not retried on every call)."""
    global _hub_down
    if _hub_down is None:
        _hub_down = hub_problem() or ""
    return _hub_down or None


def read_text(source: Any, split: str = "test", *, strip_bom: bool = False) -> str:
    """The evaluation text as one string, from a file path, a ``datasets`` dataset, a list of strings or a name.

    Datasets and lists are joined with "\\n\\n" (empty rows kept), as the usual WikiText evaluation does. A file
    is read as plain UTF-8: a leading byte-order mark stays in the text (the project's benchmarks do the same;
    ``strip_bom=True`` drops it). Names (``DATASETS``) need the Hub, so only work online.
    """
    if isinstance(source, os.PathLike) or (isinstance(source, str) and os.path.isfile(source)):
        return _read_file(source, strip_bom)
    if isinstance(source, str):
        if source not in DATASETS:
            raise FileNotFoundError(
                f"{source!r} is neither a text file nor a known dataset name ({', '.join(DATASETS)})")
        return _load_named_dataset(source, split)
    if isinstance(source, (list, tuple)):
        if not all(isinstance(s, str) for s in source):
            raise TypeError("read_text: a list source must contain only strings")
        return "\n\n".join(source)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None:
        if isinstance(source, datasets.DatasetDict):
            if split not in source:
                raise KeyError(f"the DatasetDict has no split {split!r} (it has {', '.join(source)})")
            source = source[split]
        if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
            if "text" not in (source.column_names or []):
                raise ValueError(f"the dataset has no 'text' column (columns: {source.column_names})")
            if isinstance(source, datasets.Dataset):
                return "\n\n".join(source["text"])
            return "\n\n".join(row["text"] for row in source)
    raise TypeError(f"read_text: unsupported source of type {type(source).__name__}; "
                    "pass a file path, a list of strings, a datasets.Dataset or one of " + ", ".join(DATASETS))


def _load_named_dataset(name: str, split: str) -> str:
    path, config, kwargs, aliases = DATASETS[name]
    split = aliases.get(split, split)
    down = hub_unreachable()
    if down:
        raise DatasetUnavailableError(
            f"could not load the dataset {name!r} ({path}): {down}. Loading a dataset by name needs internet "
            "access; pass a local text file instead (e.g. ../shared/data/wikitext-2/test.txt).")
    try:
        import datasets

        data = datasets.load_dataset(path, config, split=split, **kwargs)
        if kwargs.get("streaming"):
            return "\n\n".join(row["text"] for row, _ in zip(data, range(MAX_STREAMED_DOCUMENTS)))
        return read_text(data)
    except Exception as err:
        raise DatasetUnavailableError(
            f"could not load the dataset {name!r} ({path}, {config}, split={split!r}) from the Hub: {err}. "
            "Loading a dataset by name needs internet access; pass a local text file instead "
            "(e.g. ../shared/data/wikitext-2/test.txt)."
        ) from err


def tokenize_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> "torch.Tensor":
    """Token ids (1-D LongTensor) of the whole text, tokenized once and without truncation.

    Special tokens are what the tokenizer's default call adds to one sequence (at most one BOS at the very
    start; SmolLM2 and GPT-2 add none), as in the GPTQ/SparseGPT WikiText evaluation; nothing per window.
    Fast tokenizers take the whole text in one call; slow ones get it in line-aligned pieces for speed.
    """
    if not text:
        raise ValueError("tokenize_text: the text is empty")
    if getattr(tokenizer, "is_fast", True) or len(text) <= _SLOW_TOKENIZER_CHUNK:
        # verbose=False silences "Token indices sequence length is longer than the specified maximum".
        ids = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
    else:
        ids = []
        pieces = _split_lines(text, _SLOW_TOKENIZER_CHUNK)
        _logger().info("tokenizing %d characters in %d pieces (slow tokenizer)", len(text), len(pieces))
        for piece in pieces:
            ids += tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        if add_special_tokens and hasattr(tokenizer, "build_inputs_with_special_tokens"):
            ids = tokenizer.build_inputs_with_special_tokens(ids)
    import torch

    return torch.tensor(ids, dtype=torch.long)


def _split_lines(text: str, size: int) -> list[str]:
    """Pieces of about ``size`` characters, each ending at a newline where possible."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        pieces.append(text[start:end])
        start = end
    return pieces
