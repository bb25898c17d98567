"""A small Llama-style decoder in plain PyTorch, for ``blockwise-fp8 demo`` and the model benchmark.

Pre-norm blocks (RMSNorm, grouped-query attention with rotary embeddings, a SwiGLU MLP), every
projection an ``nn.Linear`` without bias, as in Llama 3. Nothing here knows about quantization:
``quantize_`` swaps the Linear weights from outside. A static KV cache (``setup_cache``) makes
a decode step a fixed-shape function of ``(hidden, pos)``, which is what CUDA graphs need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DecoderConfig", "DecoderLayer", "DecoderStack", "TinyLM", "LLAMA3_8B", "DEMO_CPU", "DEMO_GPU", "init_weights"]


@dataclass(frozen=True)
class DecoderConfig:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = 0  # 0: a bare decoder stack (hidden states in, hidden states out)
    rope_theta: float = 500000.0
    eps: float = 1e-5

    def __post_init__(self):
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}), and heads by kv_heads ({self.kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


# Llama-3-8B's layer: hidden 4096, MLP 14336, 32 query heads, 8 KV heads (vocab 128256, 32 layers).
LLAMA3_8B = DecoderConfig(hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=32)
DEMO_CPU = DecoderConfig(hidden=512, ffn=1536, heads=8, kv_heads=4, layers=2, vocab=2048)
DEMO_GPU = DecoderConfig(hidden=4096, ffn=14336, heads=32, kv_heads=8, layers=2, vocab=32768)


def _rope_tables(cfg: DecoderConfig, max_len: int, device=None):
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
    ang = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv)
    return torch.cos(ang), torch.sin(ang)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, S, D); cos/sin: (S, D/2). Rotation of (even, odd) halves, computed in float32.
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden, cfg.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=cfg.eps)
        self.q_proj = nn.Linear(d, cfg.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.heads * hd, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.eps)
        self.gate_proj = nn.Linear(d, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(d, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, d, bias=False)
        # static KV cache (buffers, so torch.compile and CUDA graphs see fixed addresses)
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def _qkv(self, x):
        B, S, _ = x.shape
        cfg = self.cfg
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, S, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, S, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        return q, k, v

    def _finish(self, x, attn):
        B, _, S, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(B, S, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Prefill: x (B, S, hidden), causal attention over the S positions given."""
        q, k, v = self._qkv(x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.cache_k is not None:
            S = x.shape[1]
            self.cache_k[:, :, :S].copy_(k)
            self.cache_v[:, :, :S].copy_(v)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self._finish(x, attn)

    def decode(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x (B, 1, hidden) at position ``pos`` (a 1-element int64 tensor)."""
        q, k, v = self._qkv(x)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        self.cache_k.index_copy_(2, pos, k)
        self.cache_v.index_copy_(2, pos, v)
        L = self.cache_k.shape[2]
        mask = (torch.arange(L, device=x.device) <= pos).view(1, 1, 1, L)
        attn = F.scaled_dot_product_attention(q, self.cache_k, self.cache_v, attn_mask=mask, enable_gqa=True)
        return self._finish(x, attn)


class DecoderStack(nn.Module):
    """``cfg.layers`` decoder layers and a final RMSNorm: hidden states in, hidden states out."""

    def __init__(self, cfg: DecoderConfig, max_len: int = 4096):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.eps)
        cos, sin = _rope_tables(cfg, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def setup_cache(self, batch: int, max_len: int, dtype=torch.bfloat16, device=None) -> None:
        """Allocate a static KV cache of ``max_len`` positions for ``batch`` sequences."""
        if max_len > self.cos.shape[0]:
            raise ValueError(f"max_len {max_len} exceeds the rotary table length {self.cos.shape[0]}")
        device = device or self.cos.device
        shape = (batch, self.cfg.kv_heads, max_len, self.cfg.head_dim)
        for layer in self.layers:
            layer.cache_k = torch.zeros(shape, dtype=dtype, device=device)  # assigning to a registered buffer
            layer.cache_v = torch.zeros(shape, dtype=dtype, device=device)
            # fixed addresses: CUDA graphs replay the in-place cache writes instead of skipping them
            torch._dynamo.mark_static_address(layer.cache_k)
            torch._dynamo.mark_static_address(layer.cache_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1]
        cos, sin = self.cos[:S], self.sin[:S]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def decode(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos[pos], self.sin[pos]
        for layer in self.layers:
            x = layer.decode(x, pos, cos, sin)
        return self.norm(x)

    @staticmethod
    def tensor_parallel_plan() -> dict:
        """The Megatron-style plan for ``parallelize_module``: q/k/v/gate/up split their outputs
        (column-wise), o/down their inputs (row-wise, one all-reduce per block)."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        plan = {f"layers.*.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")}
        plan.update({f"layers.*.{n}": RowwiseParallel() for n in ("o_proj", "down_proj")})
        return plan

    def localize_for_tensor_parallel(self, tp: int) -> None:
        """After sharding with :meth:`tensor_parallel_plan` over ``tp`` ranks: each rank computes
        heads/tp query heads, kv_heads/tp KV heads and ffn/tp MLP channels (the layers read those
        sizes from their ``cfg`` when reshaping)."""
        c = self.cfg
        local = dataclasses.replace(
            c, hidden=c.hidden // tp, heads=c.heads // tp, kv_heads=c.kv_heads // tp, ffn=c.ffn // tp
        )
        self.cfg = local
        for layer in self.layers:
            layer.cfg = local


class TinyLM(nn.Module):
    """Token embedding, a :class:`DecoderStack`, and an untied ``lm_head``."""

    def __init__(self, cfg: DecoderConfig, max_len: int = 4096):
        super().__init__()
        if cfg.vocab <= 0:
            raise ValueError(f"TinyLM needs a vocabulary, got vocab={cfg.vocab}")
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.model = DecoderStack(cfg, max_len)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(self.embed(ids)))


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights (std 1/sqrt(fan_in) for Linears, so activations keep their scale)."""
    gens: dict = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                std = 1.0 if name.endswith("embed.weight") else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
    return model
