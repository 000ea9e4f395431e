"""BERT and the RoBERTa family (RoBERTa, XLM-R, CamemBERT): post-norm layers, learned absolute positions.

The layers are the model's own; packed rows call them with a block-diagonal mask and per-span position
ids. `layer_at` computes a layer at some slots only from the layer's own submodules, and `FusedQKV`
makes query, key and value one matmul.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
from torch import nn

from coco_accel.model.families.base import Family, Rows, layer_output


def layer_at(layer: nn.Module, hidden: torch.Tensor, attn_mask: torch.Tensor, queries: torch.Tensor,
             take: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """One BERT-style layer's output at the `want` slots only: [len(want), H] from hidden [R, P, H].

    Keys and values come from every slot; the queries, the attention output, the feed-forward block and
    their layer norms only from the wanted ones. The layer's own submodules compute, so the numbers are
    the full layer's at those slots, up to the rounding of smaller matmuls. attn_mask: [R, 1, Q, P] bool,
    True where the query at that place may attend; queries, take: see `query_layout`."""
    r, p, h = hidden.shape
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    flat = hidden.reshape(r * p, h)
    x_q = flat[queries].view(r, -1, h)
    fused = getattr(attention, "fused_qkv", None)
    with fused.separately() if fused is not None else nullcontext():  # queries and keys differ here
        q = attention.query(x_q).view(r, -1, heads, size).transpose(1, 2)
        k = attention.key(hidden).view(r, p, heads, size).transpose(1, 2)
        v = attention.value(hidden).view(r, p, heads, size).transpose(1, 2)
    context = nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=attention.dropout.p if layer.training else 0.0, scale=size ** -0.5)
    context = context.transpose(1, 2).reshape(-1, h)[take]
    attended = layer.attention.output(context, flat[want])
    return layer.output(layer.intermediate(attended), attended)


class FusedQKV:
    """Query, key and value of one self-attention module as ONE matmul over their concatenated weights.

    The model's own attention code still calls `query(x)`, `key(x)` and `value(x)`; the first call
    computes all three, the next two return their parts. The parameters stay where they are, so
    checkpoints, the export and the optimizer see the model unchanged. Worth it on a GPU under
    autocast, where each Linear casts the fp32 input to 16 bits on its own: one matmul reads and casts
    the input once, and its backward forms the input's gradient in one matmul instead of three summed.
    The same arithmetic, up to the rounding of a wider matmul. Falls back to the separate Linears when
    the input is another tensor or under ZeRO-3 (which gathers only the called module's parameters).
    """

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear):
        self.linears = (query, key, value)
        self.pending = None  # (input, key part, value part) between the query call and the value call
        self.fuse = True
        query.forward, key.forward, value.forward = self.query, self.key, self.value

    @contextmanager
    def separately(self):
        """Each Linear on its own inside (`layer_at` asks for queries of other tokens than its keys)."""
        self.fuse = False
        try:
            yield
        finally:
            self.fuse = True

    def query(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.linears
        if not self.fuse or hasattr(q.weight, "ds_id"):
            self.pending = None
            return nn.functional.linear(x, q.weight, q.bias)
        both = nn.functional.linear(x, torch.cat([q.weight, k.weight, v.weight]), torch.cat([q.bias, k.bias, v.bias]))
        q_part, k_part, v_part = both.split([q.out_features, k.out_features, v.out_features], dim=-1)
        self.pending = (x, k_part, v_part)
        return q_part

    def key(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending is not None and self.pending[0] is x:
            return self.pending[1]
        return nn.functional.linear(x, self.linears[1].weight, self.linears[1].bias)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is x:
            return pending[2]
        return nn.functional.linear(x, self.linears[2].weight, self.linears[2].bias)


def fuse_qkv(module: nn.Module) -> int:
    """Install FusedQKV in every self-attention block below `module` with query/key/value Linears that
    have biases (BERT and RoBERTa families); returns how many."""
    count = 0
    for block in module.modules():
        parts = [getattr(block, name, None) for name in ("query", "key", "value")]
        if all(isinstance(p, nn.Linear) and p.bias is not None for p in parts):
            block.fused_qkv = FusedQKV(*parts)
            count += 1
    return count


class BertFamily(Family):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")

    def __init__(self, mlm: nn.Module, fused_qkv: bool = True):
        super().__init__(mlm)
        self.is_bert = mlm.config.model_type == "bert"
        self.fused_qkv = fused_qkv
        self.layer_at = layer_at  # compile_parts swaps in a compiled one
        if fused_qkv:
            fuse_qkv(mlm)

    @property
    def layers(self) -> nn.ModuleList:
        return self.mlm.base_model.encoder.layer

    @property
    def position_offset(self) -> int:
        """0 for BERT; the RoBERTa family's positions start after the padding index."""
        return 0 if self.is_bert else self.mlm.config.pad_token_id + 1

    def head_layers(self, n: int) -> nn.ModuleList:
        head = nn.ModuleList([type(self.layers[0])(self.mlm.config) for _ in range(n)])
        head.apply(self.mlm._init_weights)
        head.to(self.mlm.dtype)
        if self.fused_qkv:
            fuse_qkv(head)
        return head

    def mlm_parts(self) -> tuple[Callable, nn.Linear]:
        if self.is_bert:
            return self.mlm.cls.predictions.transform, self.mlm.cls.predictions.decoder
        head = self.mlm.lm_head  # RobertaLMHead
        return (lambda x: head.layer_norm(nn.functional.gelu(head.dense(x)))), head.decoder

    def compile_parts(self, compile_module: Callable) -> None:
        compile_module(self.mlm.base_model.embeddings)
        for layer in self.layers:
            compile_module(layer)
        transform, _ = self.mlm_parts()
        if isinstance(transform, nn.Module):
            compile_module(transform)
        self.layer_at = torch.compile(layer_at, dynamic=True)

    def embed(self, input_ids: torch.Tensor, rows: Rows) -> torch.Tensor:
        return self.mlm.base_model.embeddings(input_ids=input_ids, position_ids=rows.positions + self.position_offset,
                                              token_type_ids=torch.zeros_like(input_ids))

    def _mask(self, hidden: torch.Tensor, rows: Rows):
        if "mask" not in rows.cache:
            rows.cache["mask"] = self._build_mask(hidden, rows)
        return rows.cache["mask"]

    def _build_mask(self, hidden: torch.Tensor, rows: Rows):
        """Boolean for SDPA, additive for eager attention; padded rows get transformers' own mask."""
        if rows.attention_mask is not None:
            from transformers.masking_utils import create_bidirectional_mask

            # Positional: transformers renamed the second argument (input_embeds in 5.0, inputs_embeds later).
            return create_bidirectional_mask(self.mlm.config, hidden, rows.attention_mask)
        same = rows.same_span()
        if self.mlm.config._attn_implementation == "sdpa":
            return same
        dtype = next(self.mlm.parameters()).dtype
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        return layer_output(layer(hidden, self._mask(hidden, rows)))

    def run_layer_at(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows, at) -> torch.Tensor:
        return self.layer_at(layer, hidden, rows.same_span(at.queries), at.queries, at.take, at.want)
