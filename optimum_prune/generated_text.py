"""Data-free healing text: text the dense model samples itself, deduplicated and cached on disk.

Healing on WikiText and evaluating on WikiText measures domain adaptation as much as recovery; text sampled
from the dense model carries only what the model already knows. Sampling is batch by batch: batch ``b`` starts
from prompt ``prompts[b % len(prompts)]`` ("" = the BOS token alone) with its own seed derived from
(``split``, ``seed``, ``b``), so a pool is the same whether it was generated in one go, resumed after an
interruption, or extended later. Each batch is written as it finishes (``batch-NNNNNN.json``) next to a
``manifest.json`` that records the model and tokenizer fingerprints and every sampling setting; a directory
holding text of another model or other settings is refused. Deduplication happens when the pool is read:
texts shorter than ``min_tokens`` and texts sharing a ``dedup_ngram``-token span with an earlier kept text
are dropped. Use it as ``train_dataset="generated"`` (or ``"generated:N"`` for N windows) in healing, or as
``calibration="generated"``; ``heldout_kl`` measures KL to the dense model on a separate held-out pool.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .fingerprints import model_fingerprint, tokenizer_fingerprint
from .saving import atomic_write_text

logger = logging.get_logger(__name__)

FORMAT = "optimum-prune generated text"
VERSION = 1
MANIFEST = "manifest.json"
SOURCE = "generated"
"""The dataset name that selects generated text (``"generated"`` or ``"generated:<windows>"``)."""
CACHE_ENV_VAR = "OPTIMUM_PRUNE_CACHE"


class GeneratedTextError(ValueError):
    """Generated text that cannot be produced or reused (other settings in the cache, no start token); names the fix."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the pool is sampled (all part of the cache's identity) and how it is deduplicated (applied on reading)."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 512
    """Sampled tokens per text (a text ends earlier at EOS or any other special token)."""
    batch_size: int = 32
    """Texts sampled together (part of the identity: it changes the random stream); larger is faster per token."""
    prompts: tuple[str, ...] = ("",)
    """Generic prompts, cycled per batch; "" starts from the BOS token alone."""
    split: str = "train"
    """"train" or "heldout": the held-out pool draws independent seeds."""
    min_tokens: int = field(default=16, compare=False)
    dedup_ngram: int = field(default=32, compare=False)

    def __post_init__(self) -> None:
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise GeneratedTextError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.dedup_ngram < 1:
            raise GeneratedTextError("max_new_tokens, batch_size and dedup_ngram must be positive")
        if not self.prompts:
            raise GeneratedTextError("prompts must hold at least one prompt (\"\" starts from the BOS token)")
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def sampling(self) -> dict[str, Any]:
        """The settings that define the sampled text (the cache's identity besides model and tokenizer)."""
        return {k: v for k, v in asdict(self).items() if k not in ("min_tokens", "dedup_ngram")}


DEFAULTS = GenerationSettings()
"""The settings of ``"generated"`` datasets (``load_calibration`` replaces only the seed)."""


def default_cache_dir() -> Path:
    """``$OPTIMUM_PRUNE_CACHE/generated``, else ``~/.cache/optimum_prune/generated``."""
    root = os.environ.get(CACHE_ENV_VAR)
    return Path(root).expanduser() / "generated" if root else Path.home() / ".cache" / "optimum_prune" / "generated"


def batch_seed(settings: GenerationSettings, index: int) -> int:
    """The seed of batch ``index``: independent of how many batches were sampled before, and per split."""
    return int(hashlib.sha256(f"{settings.split}:{settings.seed}:{index}".encode()).hexdigest()[:15], 16)


class Deduplicator:
    """Keeps a text unless it is shorter than ``min_tokens`` or shares an ``ngram``-token span (the whole text, if
    shorter) with an earlier kept text; exact repeats are the simplest case. Incremental: one pass over a pool."""

    def __init__(self, ngram: int = 32, min_tokens: int = 16) -> None:
        self.ngram, self.min_tokens = ngram, min_tokens
        self.seen: set[int] = set()
        self.counts = {"kept": 0, "too_short": 0, "duplicates": 0}

    def add(self, ids: list[int]) -> bool:
        """Whether the text is kept (its spans then count as seen)."""
        if len(ids) < self.min_tokens:
            self.counts["too_short"] += 1
            return False
        n = self.ngram
        spans = {hash(tuple(ids[j:j + n])) for j in range(max(1, len(ids) - n + 1))}
        if not spans.isdisjoint(self.seen):
            self.counts["duplicates"] += 1
            return False
        self.seen |= spans
        self.counts["kept"] += 1
        return True


def deduplicate(token_lists: list[list[int]], ngram: int = 32,
                min_tokens: int = 16) -> tuple[list[int], dict[str, int]]:
    """Indices of the texts ``Deduplicator`` keeps, in order, and the counts kept / too short / duplicates."""
    dedup = Deduplicator(ngram, min_tokens)
    kept = [i for i, ids in enumerate(token_lists) if dedup.add(ids)]
    return kept, dict(dedup.counts)


@dataclass
class GeneratedPool:
    """The texts of a pool in batch order, their token ids, and which of them deduplication keeps."""

    directory: Path
    settings: GenerationSettings
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    batches: int = 0
    kept_indices: list[int] = field(default_factory=list)
    kept_token_count: int = 0
    _dedup: Deduplicator | None = field(default=None, repr=False)

    def add(self, texts: list[str], token_ids: list[list[int]]) -> None:
        """Append one batch, deduplicating it against everything before."""
        if self._dedup is None:
            self._dedup = Deduplicator(self.settings.dedup_ngram, self.settings.min_tokens)
        for text, ids in zip(texts, token_ids):
            if self._dedup.add(ids):
                self.kept_indices.append(len(self.texts))
                self.kept_token_count += len(ids)
            self.texts.append(text)
            self.token_ids.append(ids)
        self.batches += 1

    def kept(self) -> tuple[list[int], dict[str, int]]:
        """Indices of the kept texts and the deduplication counts."""
        counts = dict(self._dedup.counts) if self._dedup else {"kept": 0, "too_short": 0, "duplicates": 0}
        return list(self.kept_indices), counts

    def kept_texts(self) -> list[str]:
        return [self.texts[i] for i in self.kept_indices]


def _start_token(model: nn.Module, tokenizer: Any) -> int:
    for value in (getattr(model.config, "bos_token_id", None), getattr(tokenizer, "bos_token_id", None),
                  _eos(model, tokenizer)):
        if isinstance(value, int):
            return value
    raise GeneratedTextError("the model has neither a BOS nor an EOS token to start sampling from: pass "
                             "prompts= with non-empty text")


def _eos(model: nn.Module, tokenizer: Any) -> int | None:
    value = getattr(model.config, "eos_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) else getattr(tokenizer, "eos_token_id", None)


def _stop_tokens(model: nn.Module, tokenizer: Any) -> set[int]:
    """Where a text ends: the EOS token and every special token (a document or turn boundary, e.g. <|endoftext|>)."""
    stops = set(getattr(tokenizer, "all_special_ids", None) or [])
    eos = _eos(model, tokenizer)
    return stops | ({eos} if eos is not None else set())


def _identity(model: nn.Module, tokenizer: Any, settings: GenerationSettings) -> dict[str, Any]:
    identity = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
                "sampling": settings.sampling()}
    return json.loads(json.dumps(identity))  # as the manifest stores it (tuples become lists)


def _open_directory(directory: Path, identity: dict[str, Any]) -> None:
    """Create the pool's directory and manifest, or check an existing one was made with the same identity."""
    path = directory / MANIFEST
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT or saved.get("identity") != identity:
            differ = [k for k in identity if saved.get("identity", {}).get(k) != identity[k]]
            raise GeneratedTextError(f"{directory} holds generated text of another {' and '.join(differ) or 'format'}"
                                     f" ({saved.get('identity', {}).get('sampling')}): remove it or pick another "
                                     "cache_dir")
        return
    if directory.exists() and any(directory.iterdir()):
        raise GeneratedTextError(f"{directory} exists and is not a generated-text cache: pick an empty or new "
                                 "directory")
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, "version": VERSION, "identity": identity}, indent=1))


def generate_pool(model: nn.Module, tokenizer: Any, *, num_tokens: int | None = None, num_texts: int | None = None,
                  settings: GenerationSettings | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> GeneratedPool:
    """The pool of texts sampled from ``model``, grown (and cached) until deduplication keeps ``num_tokens`` tokens
    or ``num_texts`` texts.

    ``cache_dir``: the pool's directory (default: ``default_cache_dir() / <hash of model, tokenizer, settings>``).
    Batches already on disk are read, not sampled again; a directory of other settings raises GeneratedTextError.
    """
    if tokenizer is None:
        raise GeneratedTextError("generated text needs the model's tokenizer: load the model with its tokenizer")
    if num_tokens is None and num_texts is None:
        raise GeneratedTextError("say how much text to generate: num_tokens= or num_texts=")
    settings = settings or GenerationSettings()
    identity = _identity(model, tokenizer, settings)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / hashlib.sha256(
        json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    from accelerate import PartialState

    with PartialState().main_process_first():  # under `accelerate launch` one process samples, the others read
        return _fill_pool(model, tokenizer, directory, identity, settings, num_tokens, num_texts, progress)


def _fill_pool(model: nn.Module, tokenizer: Any, directory: Path, identity: dict[str, Any],
               settings: GenerationSettings, num_tokens: int | None, num_texts: int | None,
               progress: bool) -> GeneratedPool:
    """``generate_pool`` once its arguments are checked: read the batches on disk, sample the missing ones."""
    _open_directory(directory, identity)
    pool = GeneratedPool(directory, settings)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def enough() -> bool:
        if num_texts is not None and len(pool.kept_indices) < num_texts:
            return False
        return num_tokens is None or pool.kept_token_count >= num_tokens

    bar = tqdm(total=num_tokens or num_texts, unit="tok" if num_tokens else "text", disable=not progress,
               desc=f"generated text ({settings.split}, seed {settings.seed})")
    sampled = 0
    while not enough():
        path = directory / f"batch-{pool.batches:06d}.json"
        if path.is_file():
            texts = json.loads(path.read_text())["texts"]
        else:
            texts = _sample_batch(model, tokenizer, settings, pool.batches)
            atomic_write_text(path, json.dumps({"batch": pool.batches, "seed": batch_seed(settings, pool.batches),
                                                "texts": texts}))
            sampled += 1
        pool.add(texts, [encode(t) for t in texts])
        kept, counts = pool.kept()
        bar.n = min(bar.total, pool.kept_token_count if num_tokens else len(kept))
        bar.set_postfix(counts)
        bar.refresh()
        if pool.batches >= 20 and len(kept) < pool.batches * settings.batch_size // 10:
            raise GeneratedTextError(f"deduplication keeps only {len(kept)} of {len(pool.texts)} sampled texts "
                                     f"({counts}): sample with a higher temperature / top_p, or more prompts")
    bar.close()
    if sampled:
        logger.info("generated text in %s: %d new batches, %s", directory, sampled, pool.kept()[1])
    return pool


@torch.no_grad()
def _sample_batch(model: nn.Module, tokenizer: Any, settings: GenerationSettings, index: int) -> list[str]:
    """One batch of ``settings.batch_size`` texts sampled from the batch's prompt with the batch's seed."""
    from transformers import GenerationConfig

    prompt = settings.prompts[index % len(settings.prompts)]
    ids = [_start_token(model, tokenizer)] if not prompt else tokenizer(prompt, add_special_tokens=False)["input_ids"]
    device = next(model.parameters()).device
    start = torch.tensor([ids] * settings.batch_size, device=device)
    eos = _eos(model, tokenizer)
    stops = _stop_tokens(model, tokenizer)
    config = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                              max_new_tokens=settings.max_new_tokens, eos_token_id=sorted(stops) or None,
                              pad_token_id=eos if eos is not None else 0)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(batch_seed(settings, index))
        out = model.generate(start, attention_mask=torch.ones_like(start), generation_config=config)
    model.train(was_training)
    texts = []
    for row in out[:, start.shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        texts.append(prompt + tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts


def generated_windows(model: nn.Module, tokenizer: Any, num_windows: int, seq_len: int, *,
                      settings: GenerationSettings | None = None, cache_dir: str | os.PathLike | None = None,
                      progress: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """[num_windows, seq_len] token windows of generated text and a description (for records and cards).

    The kept texts are tokenized, joined with the EOS token (the usual packing of documents) and cut into
    consecutive windows: every window is distinct text, none repeats another.
    """
    if num_windows < 1 or seq_len < 2:
        raise GeneratedTextError(f"need num_windows >= 1 and seq_len >= 2, got {num_windows} and {seq_len}")
    settings = settings or GenerationSettings()
    needed = num_windows * seq_len
    pool = generate_pool(model, tokenizer, num_tokens=needed + needed // 50 + seq_len, settings=settings,
                         cache_dir=cache_dir, progress=progress)
    separator = _eos(model, tokenizer)
    stream: list[int] = []
    for i in pool.kept()[0]:
        stream += pool.token_ids[i] + ([separator] if separator is not None else [])
        if len(stream) >= needed:
            break
    ids = torch.tensor(stream[:needed], dtype=torch.long).view(num_windows, seq_len)
    _, counts = pool.kept()
    info = {"dataset": SOURCE, "num_samples": num_windows, "seq_len": seq_len, "seed": settings.seed,
            "generation": {**settings.sampling(), "min_tokens": settings.min_tokens,
                           "dedup_ngram": settings.dedup_ngram, **counts, "cache": str(pool.directory)}}
    return ids, info


def parse_source(source: Any) -> int | bool | None:
    """``"generated"`` -> True, ``"generated:N"`` -> N (windows); anything else -> None."""
    if not isinstance(source, str) or not (source == SOURCE or source.startswith(SOURCE + ":")):
        return None
    if source == SOURCE:
        return True
    count = source[len(SOURCE) + 1:]
    if not count.isdigit() or int(count) < 1:
        raise GeneratedTextError(f"{source!r}: write 'generated' or 'generated:N' with N a positive number of windows")
    return int(count)


def heldout_kl(model: nn.Module, reference: nn.Module, tokenizer: Any, *, num_windows: int = 16,
               seq_len: int = 256, settings: GenerationSettings | None = None,
               cache_dir: str | os.PathLike | None = None, batch_size: int = 4, top_k: int | None = None,
               progress: bool = True) -> float:
    """Mean KL(reference || model) per token on held-out text generated by ``reference`` (the dense model).

    The held-out pool uses ``split="heldout"`` (seeds independent of every training pool's); the KL is
    ``evaluation.kl.kl_divergence`` on its first ``num_windows`` windows.
    """
    from .evaluation.kl import kl_divergence

    settings = settings or GenerationSettings(split="heldout")
    if settings.split == "train":
        raise GeneratedTextError("heldout_kl needs a held-out pool: pass settings with split='heldout'")
    windows, _ = generated_windows(reference, tokenizer, num_windows, seq_len, settings=settings,
                                   cache_dir=cache_dir, progress=progress)
    return kl_divergence(model, reference, windows, top_k=top_k, batch_size=batch_size, progress=progress)
