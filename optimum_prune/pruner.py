"""The Pruner: load a model, remove structures or weights, save or push a smaller, reloadable checkpoint."""

from __future__ import annotations

from typing import Any

from .methods.base import MethodConfig, with_training_args
from .session import CompressionSession


class Pruner(CompressionSession):
    """Holds a model (and its tokenizer) and prunes it in place.

    >>> pruner = Pruner.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> model = pruner.apply(PruningConfig(remove_heads={0: [0, 1, 2]}, drop_layers=[7]))   # structures
    >>> model = pruner.prune(target_speedup=1.5)                                            # ZipLM
    >>> model = pruner.prune(SparseGPTConfig(sparsity=0.7, schedule="hessian-kmeans"))     # a config object
    >>> pruner.save_pretrained("smollm2-pruned")
    """

    def prune(self, method: str | MethodConfig | None = None, **kwargs: Any) -> Any:
        """Run a pruning method: a config object (``ZipLMConfig``, ``SparseGPTConfig``, ``LayerChopConfig``,
        ``EvoPressConfig`` ...), or its name and fields as keywords.

        ``prune(target_speedup=2.0)`` is ZipLM (the default with a target; a list of targets returns a
        ``ZipLMFamily`` {target: Pruner}, this Pruner's model staying dense); ``prune(num_layers=8)`` is
        LayerChop; otherwise ``prune(sparsity=0.7)`` is SparseGPT. Every other keyword is a field of the
        method's config or of the shared ``RunConfig`` (calibration, num_samples, seq_len, seed, batch_size,
        device, checkpoint_dir, progress), or ``run=RunConfig(...)``. The fields and their documentation:
        ``optimum_prune.methods.describe(name)``; the methods: ``optimum_prune.methods.REGISTRY``.
        """
        default = ("ziplm" if kwargs.get("target_speedup") is not None else
                   "layerchop" if kwargs.get("num_layers") is not None else "sparsegpt")
        return self._keyword_call("prune", method, kwargs, default)

    def heal(self, train_dataset: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Heal a pruned causal LM by continued pretraining of all its weights; returns the Trainer metrics.

        ``train_dataset``: generic text as a text file, strings, a ``datasets.Dataset``, a dataset name or
        token ids [n, seq_len]; the other keywords are ``HealConfig`` fields (max_steps, learning_rate,
        distill_from, alpha, output_dir, resume_from_checkpoint, ...); anything else goes to
        ``TrainingArguments``. Several GPUs come from ``accelerate launch``. A sparsified model keeps its zeros.
        """
        from .methods.heal.config import HealConfig

        if isinstance(train_dataset, HealConfig):
            return self.run_method(train_dataset)
        return self.run_method(HealConfig(**with_training_args(HealConfig, {"train_dataset": train_dataset, **kwargs})))
