"""MetaGPT: a decoder-only GPT (token embedding + sinusoidal or rotary positions + causal pre-LN blocks + LM head).

The constructor keeps the original article's signature ``MetaGPT(vocab_size, embed_size, num_layers, num_heads,
dropout, max_seq_length)``; everything else is keyword-only. Every hot path goes through the package's ops, so
``backend=`` switches kernels without changing parameters or state_dict keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from metagpt_fast.backends import BACKENDS
from metagpt_fast.nn import TokenPositionalEmbedding, TransformerBlock
from metagpt_fast.ops import validation as check

IGNORE_INDEX = -1


@dataclasses.dataclass
class MetaGPTConfig:
    vocab_size: int = 256  # number of token ids (256: the byte-level tokenizer of the CLI)
    embed_size: int = 128  # width of the residual stream; divisible by num_heads
    num_layers: int = 4  # transformer blocks
    num_heads: int = 4  # attention heads per block (head dim = embed_size / num_heads)
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches while training
    max_seq_length: int = 256  # longest sequence (positions) the model accepts
    positional: Literal["sinusoidal", "rotary"] = "sinusoidal"  # absolute sin/cos added to embeddings, or RoPE
    backend: str = "auto"  # kernel backend for every op: auto, reference, triton, cuda or cpu
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    tie_weights: bool = True  # LM head shares the token embedding matrix, as GPT-2

    def __post_init__(self):
        for name in ("vocab_size", "embed_size", "num_layers", "num_heads", "max_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed_size % self.num_heads:
            raise ValueError(f"embed_size ({self.embed_size}) must be divisible by num_heads ({self.num_heads})")
        check.probability("dropout", self.dropout)
        if self.positional not in ("sinusoidal", "rotary"):
            raise ValueError(f"positional must be 'sinusoidal' or 'rotary', got {self.positional!r}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {self.backend!r}")
        if self.positional == "rotary" and (self.embed_size // self.num_heads) % 2:
            raise ValueError(f"rotary needs an even head dim, got {self.embed_size // self.num_heads}")


class MetaGPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embed_size: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        max_seq_length: int,
        *,
        positional: Literal["sinusoidal", "rotary"] = "sinusoidal",
        backend: str = "auto",
        bias: bool = True,
        tie_weights: bool = True,
    ):
        super().__init__()
        cfg = MetaGPTConfig(
            vocab_size,
            embed_size,
            num_layers,
            num_heads,
            dropout,
            max_seq_length,
            positional,
            backend,
            bias,
            tie_weights,
        )
        self.config = cfg
        rotary = cfg.positional == "rotary"
        self.embedding = TokenPositionalEmbedding(
            cfg.vocab_size,
            cfg.embed_size,
            cfg.max_seq_length,
            cfg.dropout,
            # sqrt(d) keeps std-0.02 embeddings visible next to unit-amplitude sinusoids (Vaswani et al. 3.4).
            scale=1.0 if rotary else math.sqrt(cfg.embed_size),
            sinusoidal=not rotary,
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_size, cfg.num_heads, cfg.dropout, bias=cfg.bias, rotary=rotary)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.embed_size, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.embed_size, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.embedding.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * layers)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))
        self.set_backend(cfg.backend)

    @classmethod
    def from_config(cls, cfg: MetaGPTConfig) -> MetaGPT:
        fields = dataclasses.asdict(cfg)
        positional_args = [fields.pop(k) for k in ("vocab_size", "embed_size", "num_layers", "num_heads")]
        positional_args += [fields.pop("dropout"), fields.pop("max_seq_length")]
        return cls(*positional_args, **fields)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, TokenPositionalEmbedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_backend(self, backend: str) -> MetaGPT:
        """Routes every op of the model through ``backend`` (``"auto"`` picks per op and input)."""
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.config.backend = backend
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = None if backend == "auto" else backend
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx`` ``(B, T)`` token ids → logits ``(B, T, vocab)`` and, with ``targets`` ``(B, T)``, the mean
        cross-entropy (targets equal to -1 are ignored)."""
        self._check_tokens(idx)
        x = self.embedding(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        check.tensor("targets", targets)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must hold integer token ids, got {targets.dtype}")
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def _check_tokens(self, idx: torch.Tensor) -> None:
        check.tensor("idx", idx, dims=(2,))
        if idx.shape[1] > self.config.max_seq_length:
            raise ValueError(f"idx has {idx.shape[1]} tokens, more than max_seq_length={self.config.max_seq_length}")
        check.token_ids("idx", idx, self.config.vocab_size)

    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, **options
    ) -> torch.Tensor:
        """Continues ``idx`` ``(B, T)`` by ``max_new_tokens`` tokens; ``temperature`` 0 is greedy.

        Through a static KV cache by default. ``options`` (``top_p``, ``stop_tokens``, ``lengths``, ``pad_token``,
        ``generator``, ``use_cache``, ``compile``, ``sliding``) and the other prompt forms: see
        :func:`metagpt_fast.generation.generate`.
        """
        from metagpt_fast.generation import generate

        return generate(self, idx, max_new_tokens, temperature, top_k, **options)

    def stream_generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, **options
    ):
        """Like :meth:`generate`, but yields each step's new tokens ``(B,)`` as they are sampled."""
        from metagpt_fast.generation import stream_generate

        return stream_generate(self, idx, max_new_tokens, temperature, top_k, **options)
