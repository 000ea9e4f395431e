"""The Condenser: an HF masked-LM backbone plus a small head fed [last-layer CLS; layer-`skip_from` tokens].

No distributed code and no loss normalisation here: forward returns CLS vectors and the MLM head's
states at the masked positions only (a third of a padded step's compute was logits nobody predicts);
the vocabulary projection is left to the loss (`losses.decoder_cross_entropy`), which never holds
all the logits at once.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from coco_accel.model.packing import auto_call_cost, length_groups, plan_packing, to_device


# Where each supported family keeps its (tied) MLM head: dispatch on config.model_type.
MLM_HEAD_ATTR = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head"}


class ModelError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


@dataclass
class CondenserOutput:
    cls: torch.Tensor  # [N, H] last-layer CLS of every span
    head_features: torch.Tensor  # [M, H] the MLM head's transformed head states at the M masked positions
    backbone_features: Optional[torch.Tensor]  # [M, H] the same for the backbone's last layer (late_mlm), else None
    targets: torch.Tensor  # [M] original ids at the masked positions
    computed_tokens: int  # tokens the encoder ran on, padding included
    decoder: nn.Module  # the tied vocabulary projection: logits = decoder(features)

    @property
    def head_logits(self) -> torch.Tensor:  # [M, V]
        return self.decoder(self.head_features)

    @property
    def backbone_logits(self) -> Optional[torch.Tensor]:  # [M, V] or None
        return None if self.backbone_features is None else self.decoder(self.backbone_features)


def _layer_output(out):
    """A transformers layer's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


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


class Condenser(nn.Module):
    def __init__(self, mlm: nn.Module, *, n_head_layers: int, skip_from: int, late_mlm: bool,
                 length_bucket_width: int = 0, length_bucket_call_cost: int = -1, pack_length: int = 0,
                 fused_qkv: bool = True):
        super().__init__()
        model_type = mlm.config.model_type
        if model_type not in MLM_HEAD_ATTR:
            raise ModelError(f"model_type '{model_type}' is not supported; supported: {sorted(MLM_HEAD_ATTR)}.")
        num_layers = mlm.config.num_hidden_layers
        if not 0 <= skip_from <= num_layers:
            raise ModelError(f"skip_from {skip_from} is outside the backbone's layers 0..{num_layers}.")
        self.mlm = mlm
        self.skip_from = skip_from
        self.late_mlm = late_mlm
        self.length_bucket_width = length_bucket_width
        self.length_bucket_call_cost = length_bucket_call_cost
        self.pack_length = pack_length
        if pack_length and mlm.config._attn_implementation not in ("sdpa", "eager"):
            raise ModelError(f"Packed rows need sdpa or eager attention, not {mlm.config._attn_implementation}: "
                             "set --pack_length 0 or load the model with sdpa attention.")
        layer_cls = type(mlm.base_model.encoder.layer[0])  # the backbone's own layer class
        self.c_head = nn.ModuleList([layer_cls(mlm.config) for _ in range(n_head_layers)])
        self.c_head.apply(mlm._init_weights)
        self.c_head.to(mlm.dtype)
        if fused_qkv:
            fuse_qkv(self)
        self._layer_at = layer_at  # compile_parts swaps in a compiled one

    @property
    def config(self):
        return self.mlm.config

    @property
    def position_offset(self) -> int:
        """The first position id of a span: 0 for BERT; the RoBERTa family starts after the padding index."""
        return 0 if self.mlm.config.model_type == "bert" else self.mlm.config.pad_token_id + 1

    @property
    def max_positions(self) -> int:
        """The longest span, [CLS] and [SEP] included, that the position embeddings cover."""
        return self.mlm.config.max_position_embeddings - self.position_offset

    def compile_parts(self) -> None:
        """torch.compile the backbone's embeddings and every backbone and head layer, the partial last
        layers (`layer_at`) and the MLM head's transform (a module in BERT), in place (nn.Module.compile),
        so parameter names, checkpoints and the export are unchanged. Layer by layer, because packed rows
        call the backbone's parts themselves. Dynamic shapes: the number of packed rows and of masked
        positions changes from step to step. Mask building, packing and the losses (the vocabulary
        projection included) stay eager."""
        base = self.mlm.base_model
        base.embeddings.compile(dynamic=True)
        for layer in (*base.encoder.layer, *self.c_head):  # a ModuleList has no forward of its own to compile
            layer.compile(dynamic=True)
        self._layer_at = torch.compile(layer_at, dynamic=True)
        transform, _ = self._mlm_parts()
        if isinstance(transform, nn.Module):
            transform.compile(dynamic=True)

    def _mlm_head(self) -> nn.Module:
        return getattr(self.mlm, MLM_HEAD_ATTR[self.mlm.config.model_type])

    def _mlm_parts(self):
        """(transform, decoder) of the MLM head: head(x) == decoder(transform(x))."""
        head = self._mlm_head()
        if self.mlm.config.model_type == "bert":
            return head.predictions.transform, head.predictions.decoder
        return (lambda x: head.layer_norm(nn.functional.gelu(head.dense(x)))), head.decoder  # RobertaLMHead

    def _attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        # Positional: transformers renamed the second argument (input_embeds in 5.0, inputs_embeds later).
        return create_bidirectional_mask(self.mlm.config, hidden, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer CLS only (evaluation)."""
        out = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                layout: np.ndarray, cls_only: bool = False) -> CondenserOutput:
        """input_ids, attention_mask, labels: [N, L] (right-padded); labels hold -100 where nothing is predicted.
        layout: `host_layout` of the same rows, computed once on the host (`Batch.layout`): packing and
        length groups plan from it, so the forward never reads the device to learn what the host knew.
        cls_only: only `cls` is wanted (the gradient cache's first pass, the held-out signal). The head and
        the MLM transform are skipped; the backbone computes exactly what it computes otherwise (with
        packed rows its last layer still runs at the masked slots too), so it draws the same dropout and
        `cls` is bit for bit that of the full forward. The MLM outputs come back empty.

        With `length_bucket_width` w > 0, rows are grouped by length (see `length_groups`) and each
        group runs cut to its own widest row: spans average ~27 tokens but a tenth run to 128, and
        padding every row to the batch's longest wasted most of the compute. Rows are independent, so
        the result is the padded computation's up to float rounding; CLS rows come back in input order.
        """
        if self.pack_length > 0:
            return self._forward_packed(input_ids, labels, layout, cls_only)
        if self.length_bucket_width <= 0 or input_ids.shape[0] <= 1:
            return self._forward_rows(input_ids, attention_mask, labels, cls_only)
        lengths = layout[:, 0].tolist()  # group shapes must be known on the host
        call_cost = self.length_bucket_call_cost
        call_cost = call_cost if call_cost >= 0 else auto_call_cost(input_ids.device)
        groups = length_groups(lengths, self.length_bucket_width, input_ids.shape[1], call_cost)
        if len(groups) == 1:
            width = groups[0][0]
            return self._forward_rows(input_ids[:, :width], attention_mask[:, :width], labels[:, :width], cls_only)
        order = to_device(np.concatenate([np.asarray(members, dtype=np.int64) for _, members in groups]),
                          input_ids.device)  # the rows, group after group
        parts = []
        for (width, _), idx in zip(groups, order.split([len(members) for _, members in groups])):
            parts.append(self._forward_rows(input_ids[idx, :width], attention_mask[idx, :width], labels[idx, :width],
                                            cls_only))
        inverse = torch.empty(len(lengths), dtype=torch.long, device=input_ids.device)
        inverse[order] = torch.arange(len(lengths), device=input_ids.device)
        backbone = torch.cat([p.backbone_features for p in parts]) if self.late_mlm and not cls_only else None
        return CondenserOutput(cls=torch.cat([p.cls for p in parts])[inverse],
                               head_features=torch.cat([p.head_features for p in parts]), backbone_features=backbone,
                               targets=torch.cat([p.targets for p in parts]),
                               computed_tokens=sum(p.computed_tokens for p in parts), decoder=parts[0].decoder)

    def _forward_packed(self, input_ids: torch.Tensor, labels: torch.Tensor, layout: np.ndarray,
                        cls_only: bool) -> CondenserOutput:
        """All spans in ONE encoder call, concatenated into rows of `pack_length` tokens (longer when a span
        is): attention is block-diagonal (each span sees only itself) and positions restart at every span,
        so each span is computed exactly as alone, without padding and without a call per length group.

        Planned on the host from `layout` (`plan_packing`), so nothing in the step waits for the device
        (boolean indexing would, mid-forward). The last backbone layer runs only at the slots read from
        it, and so does the last head layer (`layer_at`)."""
        layers = self.mlm.base_model.encoder.layer
        last_only = self.skip_from < len(layers)  # else the head reads the last backbone layer everywhere
        run_head = len(self.c_head) > 0 and not cls_only
        plan = plan_packing(layout, self.pack_length, last_at=(
            None if not last_only else "cls+masked" if self.late_mlm else "cls"), head_at_masked=run_head)
        rows = _PackedRows(plan.to(input_ids.device), input_ids.shape, self._layer_at)
        ids = rows.scatter(input_ids, 0)
        positions = rows.scatter(torch.arange(input_ids.shape[1], device=ids.device)[None, :].expand_as(input_ids), 0)
        mask = rows.attention_mask(self.mlm.config._attn_implementation, next(self.mlm.parameters()).dtype)
        hidden = self.mlm.base_model.embeddings(input_ids=ids, position_ids=positions + self.position_offset,
                                                token_type_ids=torch.zeros_like(ids))
        skip = hidden
        for depth, layer in enumerate(layers[:-1] if last_only else layers, start=1):
            hidden = _layer_output(layer(hidden, mask))
            if depth == self.skip_from:
                skip = hidden
        plan, n = rows.plan, input_ids.shape[0]
        if last_only:
            last = rows.partial(layers[-1], hidden, plan.last)  # [n CLS (+ M masked), H]
            cls, backbone = last[:n], last[n:]
        else:
            cls, backbone = rows.flat(hidden)[plan.starts], rows.flat(hidden)[plan.slots]
        transform, decoder = self._mlm_parts()
        if cls_only:
            return _cls_only(cls, labels, rows.tokens, decoder)
        hidden = rows.flat(skip).index_copy(0, plan.starts, cls.to(skip.dtype)).view_as(skip)
        if not len(self.c_head):
            head = rows.flat(hidden)[plan.slots]
        else:
            for layer in self.c_head[:-1]:
                hidden = _layer_output(layer(hidden, mask))
            head = rows.partial(self.c_head[-1], hidden, plan.head)
        return CondenserOutput(cls=cls, head_features=transform(head),
                               backbone_features=transform(backbone) if self.late_mlm else None,
                               targets=labels.reshape(-1)[plan.masked], computed_tokens=rows.tokens, decoder=decoder)

    def _forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      cls_only: bool) -> CondenserOutput:
        out = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        last = out.hidden_states[-1]  # [N, L, H]
        transform, decoder = self._mlm_parts()
        if cls_only:
            return _cls_only(last[:, 0], labels, input_ids.numel(), decoder)
        skip = out.hidden_states[self.skip_from]  # [N, L, H]
        hidden = torch.cat([last[:, :1], skip[:, 1:]], dim=1)
        mask = self._attention_mask(hidden, attention_mask)
        for layer in self.c_head:
            hidden = layer(hidden, mask)

        where = labels != -100  # [N, L]
        return CondenserOutput(cls=last[:, 0], head_features=transform(hidden[where]),
                               backbone_features=transform(last[where]) if self.late_mlm else None,
                               targets=labels[where], computed_tokens=input_ids.numel(), decoder=decoder)


class _PackedRows:
    """One batch's packed rows on the device: a `PackPlan` moved there, and each slot's span (`segment`,
    -1 in free space), from which the block-diagonal attention masks follow."""

    def __init__(self, plan, shape: tuple[int, int], layer_at: Callable):
        self.plan, self.layer_at = plan, layer_at
        n, width = shape
        self.tokens = plan.rows * plan.capacity  # slots computed by every full layer
        self.segment = self.scatter(torch.arange(n, device=plan.starts.device)[:, None].expand(n, width), -1)

    def scatter(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """[N, L] per-token values placed in the rows, [rows, capacity]; `fill` in free slots."""
        out = torch.full((self.tokens,), fill, dtype=values.dtype, device=values.device)
        out[self.plan.dest] = values.reshape(-1)[self.plan.src]
        return out.view(self.plan.rows, self.plan.capacity)

    def flat(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(self.tokens, -1)

    def attention_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
        """Each slot attends within its span; free slots attend to each other (never a fully masked row:
        its softmax would be NaN). Boolean for SDPA, additive for eager attention."""
        same = self.segment[:, None, :, None] == self.segment[:, None, None, :]  # [R, 1, P, P]
        if attn_implementation == "sdpa":
            return same
        return torch.zeros(same.shape, dtype=dtype, device=same.device).masked_fill(~same, torch.finfo(dtype).min)

    def partial(self, layer: nn.Module, hidden: torch.Tensor, at) -> torch.Tensor:
        """`layer`'s output at the slots of the `PartialLayer` `at` only, [M, H]."""
        seg_q = self.segment.reshape(-1)[at.queries].view(self.plan.rows, 1, at.per_row, 1)
        return self.layer_at(layer, hidden, seg_q == self.segment[:, None, None, :], at.queries, at.take, at.want)


def _cls_only(cls: torch.Tensor, labels: torch.Tensor, computed_tokens: int, decoder: nn.Module) -> CondenserOutput:
    """A forward's output when only CLS was computed: no MLM features, no targets."""
    return CondenserOutput(cls=cls, head_features=cls.new_zeros((0, cls.shape[-1])), backbone_features=None,
                           targets=labels.new_zeros((0,)), computed_tokens=computed_tokens, decoder=decoder)


def disable_backbone_dropout(model: Condenser) -> int:
    """What the reference's `lm.eval()` inside forward did to training: backbone dropout off (the Condenser
    head is untouched). Returns the number of dropout modules switched off."""
    n = 0
    for module in model.mlm.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            n += 1
    return n
