"""ModernBERT (and the encoders that share its architecture: gte-modernbert, Ettin, nomic's ModernBERT
embedders): pre-norm layers, rotary positions, sliding-window layers between global ones, a final norm.

Packed rows give each span its own positions (restarting at 0), so its rotary embeddings are the ones
it has alone; a sliding-window layer's mask is "same span, and at most `config.sliding_window` positions
apart", exactly transformers' bidirectional window within one sequence. The Condenser head is built from
ModernBERT layers placed as the backbone's last ones (so a copied layer keeps its attention kind), with
a final norm after it as the backbone has before its MLM head.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from coco_accel.model.families.base import Family, Rows


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, heads, S, D] at positions whose cos/sin are [R, S, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class ModernBertFamily(Family):
    model_types = ("modernbert",)

    def __init__(self, mlm: nn.Module, fused_qkv: bool = True):
        super().__init__(mlm)  # query, key and value are one matmul (Wqkv) in the model itself

    @property
    def layers(self) -> nn.ModuleList:
        return self.mlm.model.layers

    @property
    def max_positions(self) -> int:
        return self.mlm.config.max_position_embeddings  # rotary: the length it was trained to

    def head_layers(self, n: int) -> nn.ModuleList:
        layer_cls, count = type(self.layers[0]), len(self.layers)
        # Placed as the backbone's last n: layer i then has the attention kind (global or sliding) of the
        # backbone layer it would copy under --head_init copy.
        head = nn.ModuleList([layer_cls(self.mlm.config, layer_idx=max(count - n + i, 1)) for i in range(n)])
        head.apply(self.mlm._init_weights)
        return head.to(self.mlm.dtype)

    def head_norm(self) -> Optional[nn.Module]:
        final = self.mlm.model.final_norm
        norm = nn.LayerNorm(final.normalized_shape, eps=final.eps, bias=final.bias is not None)
        return norm.to(self.mlm.dtype)

    def copy_into_head(self, head: nn.ModuleList, norm: Optional[nn.Module]) -> None:
        super().copy_into_head(head, norm)
        norm.load_state_dict(self.mlm.model.final_norm.state_dict())

    def mlm_parts(self) -> tuple[Callable, nn.Linear]:
        return self.mlm.head, self.mlm.decoder

    def compile_parts(self, compile_module: Callable) -> None:
        compile_module(self.mlm.model.embeddings)
        for layer in self.layers:
            compile_module(layer)
        compile_module(self.mlm.head)

    def embed(self, input_ids: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self.mlm.model.embeddings(input_ids=input_ids)  # positions enter through the rotary embeddings

    def _rope(self, hidden: torch.Tensor, rows: Rows, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", kind)
        if key not in rows.cache:
            rows.cache[key] = self.mlm.model.rotary_emb(hidden, rows.positions, kind)
        return rows.cache[key]

    def _allowed(self, rows: Rows, kind: str, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[R, 1, Q, P] bool: same span, and within the window for a sliding layer."""
        allowed = rows.same_span(queries)
        if kind == "sliding_attention":
            distance = rows.query_positions(queries)[:, :, None] - rows.positions[:, None, :]
            allowed = allowed & (distance.abs() <= self.mlm.config.sliding_window)[:, None]
        return allowed

    def _mask(self, hidden: torch.Tensor, rows: Rows, kind: str):
        key = ("mask", kind)
        if key not in rows.cache:
            rows.cache[key] = self._build_mask(hidden, rows, kind)
        return rows.cache[key]

    def _build_mask(self, hidden: torch.Tensor, rows: Rows, kind: str):
        """Padded rows get transformers' own masks; packed rows theirs: boolean for SDPA, additive for eager."""
        if rows.attention_mask is not None:
            from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

            build = create_bidirectional_mask if kind == "full_attention" else create_bidirectional_sliding_window_mask
            return build(config=self.mlm.config, inputs_embeds=hidden, attention_mask=rows.attention_mask)
        allowed = self._allowed(rows, kind)
        if self.mlm.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(self.mlm.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        kind = layer.attention_type
        return layer(hidden, attention_mask=self._mask(hidden, rows, kind),
                     position_embeddings=self._rope(hidden, rows, kind))

    def run_layer_at(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows, at) -> torch.Tensor:
        r, p, h = hidden.shape
        attn, kind = layer.attn, layer.attention_type
        heads, size = self.mlm.config.num_attention_heads, attn.head_dim
        qkv = attn.Wqkv(layer.attn_norm(hidden)).view(r, p, 3, heads, size)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [R, heads, P, D]
        cos, sin = self._rope(hidden, rows, kind)
        pick = lambda t: t.transpose(1, 2).reshape(r * p, -1, size)[at.queries].view(r, -1, heads, size).transpose(1, 2)
        q_at = _rotary(pick(q), cos.reshape(r * p, -1)[at.queries].view(r, -1, size),
                       sin.reshape(r * p, -1)[at.queries].view(r, -1, size))
        context = nn.functional.scaled_dot_product_attention(
            q_at, _rotary(k, cos, sin), v, attn_mask=self._allowed(rows, kind, at.queries),
            dropout_p=attn.attention_dropout if layer.training else 0.0, scale=size ** -0.5)
        context = context.transpose(1, 2).reshape(-1, h)[at.take]
        attended = hidden.reshape(r * p, h)[at.want] + attn.out_drop(attn.Wo(context))
        return attended + layer.mlp(layer.mlp_norm(attended))

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlm.model.final_norm(hidden)
