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
from metagpt_fast.nn import LayerNorm, TokenPositionalEmbedding, TransformerBlock
from metagpt_fast.nn.attention import PackedSequences
from metagpt_fast.ops import embed_positions, linear_cross_entropy
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.reference.positional import sinusoidal_table

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
    # Fused training kernels: LayerNorm with the residual add, bias+GELU, and (forward(..., return_logits=False)) the
    # LM head's loss without its logits. Parameters and state_dict keys are the same either way.
    fused: bool = True

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
        check.flag("fused", self.fused)


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
        fused: bool = True,
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
            fused=fused,
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
            TransformerBlock(cfg.embed_size, cfg.num_heads, cfg.dropout, bias=cfg.bias, rotary=rotary, fused=cfg.fused)
            for _ in range(cfg.num_layers)
        )
        self.ln_f = (LayerNorm if cfg.fused else nn.LayerNorm)(cfg.embed_size, bias=cfg.bias)
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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        packed: PackedSequences | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``idx`` ``(B, T)`` token ids → logits ``(B, T, vocab)`` and, with ``targets`` ``(B, T)``, the mean
        cross-entropy in float32 (float64 for a float64 model; targets equal to -1 are ignored).

        ``return_logits=False`` (with ``targets``; training loops) returns ``(None, loss)``: with ``config.fused`` the
        loss then comes from :func:`metagpt_fast.linear_cross_entropy`, which never holds the ``(B, T, vocab)``
        logits or their gradient (the step's largest tensors at GPT-2's vocabulary).

        ``packed``: each row holds several documents (:class:`metagpt_fast.nn.PackedSequences`, e.g. from
        :func:`metagpt_fast.data.packed_batch`): positions restart at each document and attention never crosses a
        boundary, so every document gets the logits it would get alone.
        """
        self._check_tokens(idx)
        check.flag("return_logits", return_logits)
        x = self.embedding(idx) if packed is None else self._packed_embedding(idx, packed)
        for block in self.blocks:
            x = block(x, packed=packed)
        h = self.ln_f(x)
        if targets is None:
            return self.lm_head(h), None
        check.tensor("targets", targets)
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise TypeError(f"targets must hold integer token ids, got {targets.dtype}")
        if self.config.fused and not return_logits:
            return None, self._fused_loss(h, targets)
        logits = self.lm_head(h)
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for a float64 model
        loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), targets.flatten(), ignore_index=IGNORE_INDEX)
        return (logits if return_logits else None), loss

    def _packed_embedding(self, idx: torch.Tensor, packed: PackedSequences) -> torch.Tensor:
        """The embedding at each token's position in its document (the fused op takes one offset per batch)."""
        if not isinstance(packed, PackedSequences):
            raise TypeError(f"packed must be a PackedSequences, got {type(packed).__name__}")
        positions = packed.position_ids
        if positions.shape != idx.shape:
            raise ValueError(f"packed.position_ids must have idx's shape {tuple(idx.shape)}, got {positions.shape}")
        emb = self.embedding
        if not emb.sinusoidal:  # rotary: the positions enter in attention
            return emb(idx)
        x = embed_positions(idx, emb.weight, emb.scale, 0, 0.0, False, backend=emb.backend)
        table = sinusoidal_table(self.config.max_seq_length, x.shape[-1], dtype=x.dtype, device=x.device)
        return F.dropout(x + table[positions], emb.dropout, self.training)

    def _fused_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The LM head's mean cross-entropy through linear_cross_entropy; under autocast the head runs in the autocast
        dtype, as ``self.lm_head(h)`` would."""
        weight = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)
        backend = None if self.config.backend == "auto" else self.config.backend
        loss = linear_cross_entropy(
            h.flatten(0, 1), weight, targets.flatten(), ignore_index=IGNORE_INDEX, backend=backend
        )
        return loss.to(torch.promote_types(loss.dtype, torch.float32))

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
