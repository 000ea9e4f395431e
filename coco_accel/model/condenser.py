"""The Condenser: an HF masked-LM backbone plus a small head fed [the span's vector; layer-`skip_from` tokens].

The backbone's family (BERT, the RoBERTa family, ModernBERT: `families/`) says how its layers run; this
module owns the encodings. No distributed code and no loss normalisation here: forward returns the span
vectors (last-layer CLS, or the mean of the span's tokens) and the MLM head's
states at the masked positions only (a third of a padded step's compute was logits nobody predicts);
the vocabulary projection is left to the loss (`losses.decoder_cross_entropy`), which never holds
all the logits at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from coco_accel.model.families.base import Family, Rows
from coco_accel.model.families.bert import BertFamily
from coco_accel.model.families.modernbert import ModernBertFamily
from coco_accel.model.packing import auto_call_cost, length_groups, plan_packing, to_device

# The encoder families, each one module of families/: adding one is its module and a line here.
FAMILIES: tuple[type[Family], ...] = (BertFamily, ModernBertFamily)
SUPPORTED_MODEL_TYPES = sorted(t for family in FAMILIES for t in family.model_types)


class ModelError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


@dataclass
class CondenserOutput:
    cls: torch.Tensor  # [N, H] every span's vector: its last-layer CLS, or the mean of its last-layer tokens
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


class Condenser(nn.Module):
    def __init__(self, mlm: nn.Module, *, n_head_layers: int, skip_from: int, late_mlm: bool,
                 length_bucket_width: int = 0, length_bucket_call_cost: int = -1, pack_length: int = 0,
                 fused_qkv: bool = True, pooling: str = "cls"):
        """pooling: the span's vector, which the contrastive loss trains, the head reads in CLS's place and
        the export's sentence-transformers config pools: "cls" (the last layer's CLS, coCondenser's and
        COCO-DR's) or "mean" (the mean of the span's last-layer tokens, CLS and SEP included, as
        sentence-transformers' mean pooling computes it)."""
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ModelError(f"pooling must be cls or mean, not {pooling!r}.")
        self.pooling = pooling
        model_type = mlm.config.model_type
        family = next((f for f in FAMILIES if model_type in f.model_types), None)
        if family is None:
            raise ModelError(f"model_type '{model_type}' is not supported; supported: {SUPPORTED_MODEL_TYPES}.")
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
        self.family = family(mlm, fused_qkv=fused_qkv)
        self.c_head = self.family.head_layers(n_head_layers)
        self.c_head_norm = self.family.head_norm() if n_head_layers else None

    @property
    def config(self):
        return self.mlm.config

    @property
    def max_positions(self) -> int:
        """The longest span, [CLS] and [SEP] included, that the positions cover."""
        return self.family.max_positions

    def compile_parts(self) -> None:
        """torch.compile the backbone's embeddings and every backbone and head layer, the partial last
        layers and the MLM head's transform (where it is a module), in place (nn.Module.compile), so
        parameter names, checkpoints and the export are unchanged. Layer by layer, because packed rows
        call the backbone's parts themselves. Dynamic shapes: the number of packed rows and of masked
        positions changes from step to step. Mask building, packing and the losses (the vocabulary
        projection included) stay eager."""
        compile_module = lambda module: module.compile(dynamic=True)  # noqa: E731
        self.family.compile_parts(compile_module)
        for layer in self.c_head:  # a ModuleList has no forward of its own to compile
            compile_module(layer)

    def copy_backbone_into_head(self) -> None:
        """--head_init copy: the head's layers (and norm) start as the backbone's last ones."""
        self.family.copy_into_head(self.c_head, self.c_head_norm)

    def _head_features(self, states: torch.Tensor, transform) -> torch.Tensor:
        """The MLM transform of the head's last states, after the head's norm where the family has one."""
        return transform(states if self.c_head_norm is None else self.c_head_norm(states))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The span vectors alone, from padded rows (evaluation)."""
        last = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return last[:, 0]
        weights = attention_mask.to(last.dtype)[:, :, None]
        return (last * weights).sum(dim=1) / weights.sum(dim=1)

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
        it (unless the span vector is a mean of all its tokens), and so does the last head layer
        (the family's `run_layer_at`)."""
        fam = self.family
        layers = fam.layers
        # The last layer runs at the slots read from it only, unless the head reads it everywhere or the
        # span vector is the mean of all its tokens.
        last_only = self.skip_from < len(layers) and self.pooling == "cls"
        run_head = len(self.c_head) > 0 and not cls_only
        plan = plan_packing(layout, self.pack_length, last_at=(
            None if not last_only else "cls+masked" if self.late_mlm else "cls"), head_at_masked=run_head)
        rows = _PackedRows(plan.to(input_ids.device), input_ids.shape)
        hidden = fam.embed(rows.scatter(input_ids, 0), rows.context)
        skip = hidden
        for depth, layer in enumerate(layers[:-1] if last_only else layers, start=1):
            hidden = fam.run_layer(layer, hidden, rows.context)
            if depth == self.skip_from:
                skip = hidden
        plan, n = rows.plan, input_ids.shape[0]
        if last_only:
            last = fam.final(fam.run_layer_at(layers[-1], hidden, rows.context, plan.last))  # [n CLS (+ M masked), H]
            cls, backbone = last[:n], last[n:]
        else:
            hidden = fam.final(hidden)
            skip = hidden if self.skip_from == len(layers) else skip  # as output_hidden_states gives it
            cls = rows.flat(hidden)[plan.starts] if self.pooling == "cls" else rows.span_means(hidden, layout)
            backbone = rows.flat(hidden)[plan.slots]
        transform, decoder = fam.mlm_parts()
        if cls_only:
            return _cls_only(cls, labels, rows.tokens, decoder)
        hidden = rows.flat(skip).index_copy(0, plan.starts, cls.to(skip.dtype)).view_as(skip)
        if not len(self.c_head):
            head = rows.flat(hidden)[plan.slots]
        else:
            for layer in self.c_head[:-1]:
                hidden = fam.run_layer(layer, hidden, rows.context)
            head = fam.run_layer_at(self.c_head[-1], hidden, rows.context, plan.head)
        return CondenserOutput(cls=cls, head_features=self._head_features(head, transform),
                               backbone_features=transform(backbone) if self.late_mlm else None,
                               targets=labels.reshape(-1)[plan.masked], computed_tokens=rows.tokens, decoder=decoder)

    def _forward_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      cls_only: bool) -> CondenserOutput:
        hidden_states, last = self.family.encode_padded(input_ids, attention_mask)  # [N, L, H] each
        transform, decoder = self.family.mlm_parts()
        if self.pooling == "cls":
            cls = last[:, 0]
        else:
            weights = attention_mask.to(last.dtype)[:, :, None]
            cls = (last * weights).sum(dim=1) / weights.sum(dim=1)
        if cls_only:
            return _cls_only(cls, labels, input_ids.numel(), decoder)
        skip = hidden_states[self.skip_from]  # [N, L, H]
        hidden = torch.cat([cls[:, None].to(skip.dtype), skip[:, 1:]], dim=1)
        rows = Rows.padded(attention_mask)
        for layer in self.c_head:
            hidden = self.family.run_layer(layer, hidden, rows)

        where = labels != -100  # [N, L]
        return CondenserOutput(cls=cls, head_features=self._head_features(hidden[where], transform),
                               backbone_features=transform(last[where]) if self.late_mlm else None,
                               targets=labels[where], computed_tokens=input_ids.numel(), decoder=decoder)


class _PackedRows:
    """One batch's packed rows on the device: a `PackPlan` moved there, and the `Rows` context the layers
    run under (each slot's position in its span and its span, -1 in free space)."""

    def __init__(self, plan, shape: tuple[int, int]):
        self.plan = plan
        n, width = shape
        self.tokens = plan.rows * plan.capacity  # slots computed by every full layer
        device = plan.starts.device
        segment = self.scatter(torch.arange(n, device=device)[:, None].expand(n, width), -1)
        positions = self.scatter(torch.arange(width, device=device)[None, :].expand(n, width), 0)
        self.context = Rows(positions, segment)

    def scatter(self, values: torch.Tensor, fill: int) -> torch.Tensor:
        """[N, L] per-token values placed in the rows, [rows, capacity]; `fill` in free slots."""
        out = torch.full((self.tokens,), fill, dtype=values.dtype, device=values.device)
        out[self.plan.dest] = values.reshape(-1)[self.plan.src]
        return out.view(self.plan.rows, self.plan.capacity)

    def flat(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(self.tokens, -1)

    def span_means(self, hidden: torch.Tensor, layout: np.ndarray) -> torch.Tensor:
        """[N, H] the mean of each span's token states (its real tokens: [CLS] and [SEP] included)."""
        n, width = layout.shape[0], layout.shape[1] - 1
        sums = hidden.new_zeros((n, hidden.shape[-1])).index_add_(0, self.plan.src // width,
                                                                    self.flat(hidden)[self.plan.dest])
        return sums / to_device(layout[:, :1].astype(np.float64), hidden.device).to(hidden.dtype)


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
