"""One variant's validation result: what ``validate`` produces and ``report`` writes out (its own
module so that the two depend on it, and not on each other)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VariantResult:
    variant: str
    format: str
    runtime: str
    kind: str
    passed: bool
    metrics: dict[str, float]
    thresholds: dict[str, float | None]
    failures: list[str]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_1000_tokens: float = 0.0
    forward: str = ""  # transformers: resident or streamed (one layer at a time)
    peak_anon_rss_bytes: int = 0  # sampled after each prompt; excludes mapped model files (llama.cpp)
    # Per-token KL distribution (percentile -> value): what the card's side-by-side plot draws.
    kl_quantiles: dict[str, float] = field(default_factory=dict)
    # How the file says it was quantized: llama.cpp's quantize.imatrix.* keys (file, dataset, chunks_count ...)
    quantization: dict[str, str] = field(default_factory=dict)
    # The tokenizer check: probes tokenized as the source does, mismatched ones, the chat template.
    tokenizer: dict[str, object] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
