"""The Llama configuration the GPU scripts share: llama3 RoPE scaling, untied embeddings."""

from transformers import LlamaConfig


def llama3_config(original_max_positions: int, **dims) -> LlamaConfig:
    """A Llama-3-style config (rope theta 500000, llama3 scaling by 8) with the given sizes."""
    return LlamaConfig(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max_positions,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **dims,
    )
