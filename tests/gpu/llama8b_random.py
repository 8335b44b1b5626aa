"""Writes a Llama-3-8B-shaped model with random bf16 weights (for `make bench-gpu`).

Usage: python3 llama8b_random.py OUT_DIR. The weights are drawn on the GPU (seconds, not the
minutes a CPU initialisation takes) and saved as safetensors with the config.
"""

import sys

import torch
from llama_config import llama3_config
from transformers import LlamaForCausalLM

config = llama3_config(
    8192,
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(f"wrote {sys.argv[1]}")
