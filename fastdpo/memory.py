"""Per-GPU memory of DPO training under ZeRO-2, ZeRO-3 and FSDP2, from published formulas: what fits where.

    python -m fastdpo.memory            # the README table ("What fits where"); tests/test_memory.py checks they agree

Model states, mixed-precision Adam, Psi parameters on N GPUs. The ZeRO paper (Rajbhandari et al. 2020,
arXiv:1910.02054, section 3.1 and Figure 1) counts 2 Psi bf16 weights + 2 Psi bf16 gradients + K Psi optimizer
states, K = 12 (fp32 master weights, momentum, variance), sharded by stage; DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`, cpu_offload=False; tests/test_memory.py checks
these numbers against them) count the fp32 gradient partition the optimizer steps on as well:
    ZeRO-2  2 Psi  +  (2 + 4 + 12) Psi / N        weights whole on every GPU; 16-bit and fp32 gradient
                                                  partitions and the optimizer sharded
    ZeRO-3  (2 + 4 + 12) Psi / N                  everything sharded (DeepSpeed's estimate: 18 bytes per parameter
                                                  and GPU, gradients 4 of them)
    FSDP2   (4 + 4 + 8) Psi / N                   everything sharded; FSDP2's mixed precision keeps the sharded
                                                  parameters in fp32 (they are the master copy) and their
                                                  gradients in the same dtype (Zhao et al. 2023,
                                                  arXiv:2304.11277; torch's MixedPrecisionPolicy).
A sharded backend also holds the weights it has gathered for the layers in flight: counted as two units
(the current one and the prefetched next, FSDP2's default; ZeRO-3 prefetches by bucket) of the largest of a
decoder layer and the embedding matrix, in bf16.

Activations with gradient checkpointing, T tokens in one micro-batch, L layers, hidden size h: each layer's
input is kept (L x T x h x 2 bytes, bf16), and during the backward one layer's activations are recomputed in
full: 34 x T x h bytes (Korthikanti et al. 2022, arXiv:2205.05198, section 4.1: s b h (34 + 5 a s / h) per layer,
whose attention-score term flash/sdpa attention does not store). The LM head's logits are not counted: the
fused head (TRL's add_fused_lm_head) scores tokens in tiles. The reference model is not counted: the fast path
precomputes its log-probs (the stock path under ZeRO-3 holds a sharded copy, 2 Psi / N more).

T is the token budget: by default per_device_train_batch_size x 2 x max_length (fastdpo.config, token_budget).
Not counted: the CUDA context, NCCL buffers and allocator fragmentation; a configuration "fits" when its total
is at most 90% of the GPU's memory.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9
FIT = 0.9  # share of a GPU's memory the counted terms may use (the rest: CUDA context, NCCL, fragmentation)
BACKENDS = ("ZeRO-2", "ZeRO-3", "FSDP2")


@dataclass(frozen=True)
class Shape:
    """A dense decoder, as its config.json describes it."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, name: str, config) -> Shape:
        return cls(name, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        """Attention (q and o: h x h; k and v: h x kv_heads x head_dim) + gated MLP (3 x h x intermediate); the
        norms' few x h weights are left out (under 0.01% at 7B)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings


# The OLMo 3 shapes (OLMo 3 report, arXiv:2512.13961: 7B 32 layers x 4096, 32 heads; 32B 64 layers x 5120, 40
# query and 8 key/value heads; intermediate sizes and the 100,278-token vocabulary as in their config.json).
OLMO3_7B = Shape("OLMo 3 7B", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=100278)
OLMO3_32B = Shape("OLMo 3 32B", layers=64, hidden=5120, intermediate=27648, heads=40, kv_heads=8, vocab=100278)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def per_gpu(shape: Shape, backend: str, gpus: int, tokens: int) -> Memory:
    """Per-GPU memory of training `shape` with `backend` on `gpus` GPUs, `tokens` tokens per micro-batch."""
    psi, n = shape.params, gpus
    gathered = 2 * max(shape.layer_params, shape.vocab * shape.hidden) * 2  # two units in flight, bf16
    activations = shape.layers * tokens * shape.hidden * 2 + 34 * tokens * shape.hidden
    if backend == "ZeRO-2":
        return Memory(2 * psi, 6 * psi / n, 12 * psi / n, activations)
    if backend == "ZeRO-3":
        return Memory(2 * psi / n + gathered, 4 * psi / n, 12 * psi / n, activations)
    if backend == "FSDP2":
        return Memory(4 * psi / n + gathered, 4 * psi / n, 8 * psi / n, activations)
    raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")


def fits(memory: Memory, gpu_gb: float) -> bool:
    return memory.total <= FIT * gpu_gb * GB


# What the README table shows: the OLMo 3 Think length (analyze_dataset.py chose max_length 8192), pairs per GPU as
# in recipes/olmo3_think.yaml (4 GPUs) and recipes/olmo3_32b_think.yaml (16 GPUs; 8 for comparison).
ROWS = ((OLMO3_7B, 4, 8192, 4), (OLMO3_32B, 2, 8192, 8), (OLMO3_32B, 2, 8192, 16))
GPU_GB = (80, 180)


def table() -> str:
    lines = ["| model | pairs/GPU x max_length = tokens | GPUs | backend | weights | gradients | optimizer | "
             "activations | total GB | 80 GB GPU | 180 GB GPU |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for shape, pairs, max_length, gpus in ROWS:
        tokens = pairs * 2 * max_length
        for backend in BACKENDS:
            m = per_gpu(shape, backend, gpus, tokens)
            cells = [f"{x / GB:.1f}" for x in (m.weights, m.gradients, m.optimizer, m.activations, m.total)]
            marks = ["fits" if fits(m, gb) else "no" for gb in GPU_GB]
            lines.append(f"| {shape.name} ({shape.params / 1e9:.1f}B) | {pairs} x {max_length} = {tokens} | {gpus} | "
                         f"{backend} | " + " | ".join(cells + marks) + " |")
    return "\n".join(lines)


def smallest(shape: Shape, tokens: int, gpus: int, gpu_gb: float) -> str | None:
    """The first backend (ZeRO-2, then the sharded ones) whose per-GPU total fits, or None."""
    return next((b for b in BACKENDS if fits(per_gpu(shape, b, gpus, tokens), gpu_gb)), None)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(table())
