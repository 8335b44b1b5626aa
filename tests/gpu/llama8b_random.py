"""Writes a Llama-3-8B-shaped model with random bf16 weights (for `make bench-gpu`).

Usage: python3 llama8b_random.py OUT_DIR [TOKENIZER_MODEL_DIR]. The weights are drawn on the
GPU (seconds, not the minutes a CPU initialisation takes) and saved as safetensors with the
config. With a second folder (the demo model, `infinite-llm-worker demo-model`), the model takes
that folder's tokenizer and vocabulary size, so the worker can serve it over HTTP, and positions
up to 4M (`make bench-dist`: contexts beyond one GPU).
"""

import json
import shutil
import sys

import torch
from llama_config import llama3_config
from transformers import LlamaForCausalLM

served = len(sys.argv) > 2
vocab = 128256
if served:
    with open(f"{sys.argv[2]}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
config = llama3_config(
    8192,
    vocab_size=vocab,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=(1 << 22) if served else 131072,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1], safe_serialization=True)
if served:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        try:
            shutil.copy(f"{sys.argv[2]}/{name}", f"{sys.argv[1]}/{name}")
        except FileNotFoundError:
            pass
print(f"wrote {sys.argv[1]}")
