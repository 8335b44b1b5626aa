"""Writes a random-weight Llama model (GQA, llama3 RoPE scaling) as bf16 safetensors and
Hugging Face transformers' logits for it, for worker/tests/gpu_parity.rs.

Usage: python3 hf_reference.py OUT_DIR
OUT_DIR/model holds the model folder; OUT_DIR/reference.json the prompt, transformers' greedy
continuation and, per generated position, the logits in float32 (computed from the same bf16
weights upcast, the reference the worker is held to) and in bfloat16 (for the report).
"""

import json
import sys
from pathlib import Path

import torch
from llama_config import llama3_config
from transformers import LlamaForCausalLM

PROMPT = 96
STEPS = 24


def main(out: Path) -> None:
    torch.manual_seed(1234)
    config = llama3_config(
        2048,
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=6,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=16384,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)

    prompt = torch.randint(0, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    # The reference: the same bf16 weights in float32 arithmetic.
    ref = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).cuda().eval()
    low = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).cuda().eval()
    tokens = prompt.cuda()
    steps = []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = ref(tokens).logits[0, -1].float()
            logits_bf16 = low(tokens).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            nxt = int(torch.argmax(logits))
            steps.append(
                {
                    "logits": logits.cpu().tolist(),
                    "bf16_rel_err": float((logits_bf16 - logits).norm() / logits.norm()),
                    "bf16_max_abs_err": float((logits_bf16 - logits).abs().max()),
                    "margin": float(top2[0] - top2[1]),
                    "token": nxt,
                }
            )
            tokens = torch.cat([tokens, torch.tensor([[nxt]], device="cuda")], dim=1)
    (out / "reference.json").write_text(json.dumps({"prompt": prompt[0].tolist(), "steps": steps}))
    print(f"wrote {model_dir} and {out / 'reference.json'}: {STEPS} steps")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
