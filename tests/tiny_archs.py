"""Tiny random models of every supported architecture, made with transformers' own config and model
classes: a few layers, realistic head / KV-head ratios, and each family's peculiarities switched on
(biases, soft-capping, local/global layers, q/k norms, rope scaling, fused projections)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Shared shape: 4 query heads over 2 KV heads (GQA), head_dim 32 (rotary halves of 16).
BASE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    # Wider than transformers' 0.02, so that the random model's next-token distributions are peaked
    # like a trained model's: near-uniform outputs would hide a broken layer behind a tiny KL.
    "initializer_range": 0.06,
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip

# name -> (transformers model class, config class, config overrides)
# Phi-3's 128k scaling: per-frequency factors, long ones past the original 64-token context.
LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 64,
    "short_factor": [1.0 + 0.05 * i for i in range(16)],
    "long_factor": [1.0 + 0.4 * i for i in range(16)],
}
GEMMA = {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}  # < the tests' 256 tokens
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"head_dim": 32, "sliding_window": 4096}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               {**GEMMA, "hidden_activation": "gelu_pytorch_tanh", "num_hidden_layers": 4}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               {**GEMMA, "num_hidden_layers": 6, "final_logit_softcapping": 30.0}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {"original_max_position_embeddings": 2048, "pad_token_id": 0}),
    "phi3_longrope": ("Phi3ForCausalLM", "Phi3Config", {"original_max_position_embeddings": 64, "pad_token_id": 0,
                      "rope_parameters": LONGROPE}),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", {"pad_token_id": 0}),
    "apertus": ("ApertusForCausalLM", "ApertusConfig", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 12000000.0}}),
}  # fmt: skip


# Which file of release/data/architectures each tiny model proves (the others: its own name).
REGISTRY_NAME = {"llama3": "llama", "phi3_longrope": "phi3"}


def make_model(arch: str, vocab_size: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised model of ``arch``. Norm weights and biases get random values too
    (transformers initialises them to 1 / 0, which would hide a missing shift or bias)."""
    import transformers

    model_cls, config_cls, over = ARCHS[arch]
    cfg = getattr(transformers, config_cls)(**{**BASE, **over, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0 if name.endswith("bias") or arch.startswith("gemma") else 1))
            elif "act_fn" in name:  # xIELU's learned scalars
                p.add_(torch.randn_like(p) * 0.05)
    return model


def save(model: torch.nn.Module, folder: Path, tokenizer_from: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """``save_pretrained`` in ``dtype`` with a real tokenizer copied beside it."""
    import shutil

    model.to(dtype).save_pretrained(folder)
    model.float()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    # transformers 5 picks the tokenizer class from the model type (Qwen2Tokenizer for qwen2), and
    # that class brings its own pre-tokenizer over tokenizer.json's: name the generic class so that
    # the borrowed tokenizer tokenizes as it was trained (validation refuses the mismatch otherwise).
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder
