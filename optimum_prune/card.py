"""Model cards for pruned checkpoints, written with huggingface_hub's ModelCard."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .modeling.pruning_config import PruningConfig
from .records import RunRecord
from .report import PruningSummary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def build_model_card(
    summary: PruningSummary,
    structure: PruningConfig,
    *,
    pipeline_tag: str | None,
    load_class: str,
    repo_id: str | None = None,
    quantization: dict[str, Any] | None = None,
) -> ModelCard:
    """A card with Hub metadata, what was removed, the parameter reduction and the run record's figures."""
    record = RunRecord.from_config(structure)
    tags = ["optimum-prune", "pruned"] if not quantization else ["optimum-prune", "compressed-tensors", "gptq"]
    if record.method:
        tags.append(record.method)
    data = ModelCardData(
        base_model=structure.base_model,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
    )
    name = repo_id or "this model"
    origin = f"[{structure.base_model}](https://huggingface.co/{structure.base_model})" if structure.base_model else "a dense model"
    measured = []
    for label, value in (("method", record.method), ("target speedup", record.target_speedup),
                         ("measured speedup", record.measured_speedup)):
        if value is not None:
            measured.append(f"| {label} | {_fmt(value)} |")
    if record.latency_environment:
        env = ", ".join(f"{k}={_fmt(v)}" for k, v in record.latency_environment.items())
        measured.append(f"| latency environment | {env} |")
    if record.calibration:
        calib = ", ".join(f"{k}={_fmt(v)}" for k, v in record.calibration.items())
        measured.append(f"| calibration | {calib} |")
    for key, value in (quantization or {}).items():
        measured.append(f"| quantization {key.replace('_', ' ')} | {_fmt(value)} |")
    if record.layer_sparsity and len(set(record.layer_sparsity.values())) > 1:
        per_layer = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(record.layer_sparsity.items(), key=lambda kv: int(kv[0])))
        measured.append(f"| sparsity per layer | {per_layer} |")
    if record.layer_bits and len(set(record.layer_bits.values())) > 1:
        per_layer = ", ".join(f"{k}: {v}" for k, v in sorted(record.layer_bits.items(), key=lambda kv: int(kv[0])))
        measured.append(f"| bits per layer | {per_layer} |")
    for key, value in record.metrics.to_dict().items():
        measured.append(f"| {key} | {_fmt(value)} |")
    measured += _search_rows(record.search or {})
    if structure.recipe:
        measured.append("| recipe | " + " → ".join(stage.get("method", "?") for stage in structure.recipe) + " |")
    search = record.search or {}
    if search.get("target_missed"):
        measured.insert(0, f"| **warning** | measured speedup {_fmt(record.measured_speedup)}x misses the target "
                           f"{_fmt(record.target_speedup)}x by {100 * search.get('miss', 0):+.1f}% after re-aiming |")
    figures = ("\n## Measured\n\n| | |\n|---|---|\n" + "\n".join(measured) + "\n") if measured else ""
    repo = repo_id or "path/to/this/model"
    what = "Quantized" if quantization and not structure.is_structured else "Pruned"
    details = []
    if structure.is_structured:
        details.append("The removed heads, neurons, sublayers and layers are physically gone: "
                       "the weights are smaller, not zeroed.")
    if record.layer_sparsity:
        details.append("Weights inside the Linear layers were set to zero (unstructured / N:M sparsity): "
                       "the file is not smaller unless it is also quantized or stored sparse.")
    if quantization:
        details.append(f"The Linear weights of the blocks are stored as packed {quantization.get('bits')}-bit "
                       "integers (compressed-tensors `pack-quantized`), which transformers and vLLM read.")
    detail = "\n".join(details)
    content = f"""---
{data.to_yaml()}
---

# {name.split('/')[-1] if repo_id else 'Pruned model'}

{what} from {origin} with optimum-prune {__version__}.
{detail}

## What was removed

{summary.to_markdown()}
{figures}
## Usage

```python
import optimum_prune  # registers the pruned architectures with transformers
from transformers import {load_class}

model = {load_class}.from_pretrained("{repo}")
# without optimum-prune installed, the modeling code saved beside the weights is used:
model = {load_class}.from_pretrained("{repo}", trust_remote_code=True)
```

The full structure is stored under `pruning_config` in `config.json`, by original layer index.
"""
    return ModelCard(content)


_SEARCH_FIELDS = ("method", "target", "units", "predicted_speedup", "reachable_speedup", "fitness", "fitness_metric",
                  "score", "score_metric", "generations", "offspring", "survivors", "tokens", "evaluations",
                  "search_iterations", "accepted", "strategy", "start", "seed", "schedule", "num_groups", "max_shift",
                  "normalize", "stages", "requested", "average", "level_values", "fresh_windows", "level_store_mib",
                  "model_mib", "final", "stitched_fitness", "sequential_fitness", "miss", "target_missed")


def _search_rows(search: dict) -> list[str]:
    """How the per-layer choice was made (EvoPress, ZipLM, LayerChop, schedules), plus the levels it chose."""
    def shown(value) -> bool:  # scalars, and short lists of scalars
        if isinstance(value, list):
            return len(value) <= 8 and all(not isinstance(v, (dict, list)) for v in value)
        return value is not None and not isinstance(value, dict)

    rows = [f"| search {key.replace('_', ' ')} | {_fmt(search[key])} |" for key in _SEARCH_FIELDS
            if key in search and shown(search[key])]
    levels = search.get("levels")
    if isinstance(levels, dict) and levels:
        text = "; ".join(f"{layer}: " + ", ".join(f"{k} {v}" for k, v in value.items())
                         for layer, value in sorted(levels.items(), key=lambda kv: int(kv[0])))
        rows.append(f"| levels per layer | {text} |")
    return rows
