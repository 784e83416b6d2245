"""Per-token comparison of a variant's log-probs with the stored reference top-k."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_TINY = 1e-12


def compare_prompt(
    variant_logits: torch.Tensor, topk_ids: torch.Tensor, topk_lp: torch.Tensor, targets: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one prompt's predicted positions: (KL per token, top-1 agreement per token, variant
    log-prob of the actual next token, max |log p - log q| over the reference top-k per token).

    KL is over the reference's top-k tokens plus one bucket for the rest of the vocabulary.
    """
    lq = torch.log_softmax(variant_logits.double(), dim=-1)
    lp = topk_lp.double()
    lq_k = lq.gather(1, topk_ids.long())
    p = lp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - lq_k.exp().sum(-1)).clamp_min(_TINY)
    kl = (p * (lp - lq_k)).sum(-1) + torch.where(
        p_rest > _TINY, p_rest * (p_rest.clamp_min(_TINY).log() - q_rest.log()), torch.zeros_like(p_rest)
    )
    top1 = lq.argmax(-1) == topk_ids[:, 0].long()
    target = lq.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    diff = (lp - lq_k).abs().max(-1).values
    return kl.clamp_min(0).numpy(), top1.numpy(), target.numpy(), diff.numpy()


@dataclass
class Accumulator:
    kl: list[np.ndarray] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)
    target: list[np.ndarray] = field(default_factory=list)
    ref_target: list[np.ndarray] = field(default_factory=list)
    diff: list[np.ndarray] = field(default_factory=list)

    def add(self, kl: np.ndarray, top1: np.ndarray, target: np.ndarray, ref: np.ndarray, diff: np.ndarray) -> None:
        self.kl.append(kl)
        self.top1.append(top1)
        self.target.append(target)
        self.ref_target.append(ref)
        self.diff.append(diff)

    def summary(self) -> dict[str, float]:
        kl = np.concatenate(self.kl)
        ppl = float(np.exp(-np.concatenate(self.target).mean()))
        ref_ppl = float(np.exp(-np.concatenate(self.ref_target).mean()))
        return {
            "tokens": int(kl.size),
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()),
            "top1_agreement": float(np.concatenate(self.top1).mean()),
            "perplexity": ppl,
            "reference_perplexity": ref_ppl,
            "perplexity_ratio": ppl / ref_ppl,
            "max_logprob_diff": float(np.concatenate(self.diff).max()),
        }

    def kl_values(self) -> np.ndarray:
        return np.concatenate(self.kl)
