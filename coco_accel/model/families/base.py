"""How the Condenser drives one encoder family, behind a small interface: where its layers are, how to
embed tokens at given positions, how to run one layer over rows whose spans attend only to themselves
(and at some slots only), how to build the Condenser head from the family's own layer class, and
where its MLM transform and decoder are. One module per family implements it (`bert.py`, `modernbert.py`).

A layer runs under a `Rows` context: the rows' positions (restarting at every span in packed rows) and
each slot's span (`segment`, -1 in free space), from which each family builds its attention masks (and
rotary embeddings, where it has them), once per batch and kind of layer.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def layer_output(out):
    """A transformers layer's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


class Rows:
    """Rows of tokens as a layer sees them: positions [R, P] and each slot's span [R, P] (-1: free slot).
    Padded rows are rows of one span each, their padding free. What a family derives from them (masks,
    rotary embeddings) is kept here, computed once per batch."""

    def __init__(self, positions: torch.Tensor, segment: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        self.positions, self.segment = positions, segment
        self.attention_mask = attention_mask  # padded rows: the HF attention mask, [R, P]
        self.cache: dict = {}

    @classmethod
    def padded(cls, attention_mask: torch.Tensor) -> "Rows":
        n, width = attention_mask.shape
        span = torch.arange(n, device=attention_mask.device)[:, None].expand(n, width)
        positions = torch.arange(width, device=attention_mask.device)[None, :].expand(n, width)
        return cls(positions, torch.where(attention_mask.bool(), span, -1), attention_mask)

    def same_span(self, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[R, 1, Q, P] bool: the query slot and the key slot hold the same span. Free slots attend to each
        other (never a fully masked row: its softmax would be NaN). queries: flat slot indices, the same
        number per row (a partial layer), or None for every slot."""
        seg_q = self.segment[:, :, None] if queries is None else self.segment.reshape(-1)[queries].view(
            self.segment.shape[0], -1, 1)
        return (seg_q == self.segment[:, None, :])[:, None]

    def query_positions(self, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.positions if queries is None else self.positions.reshape(-1)[queries].view(self.positions.shape[0], -1)


class Family:
    """The interface every family implements (see the module's docstring); `mlm` is the HF masked-LM model."""

    model_types: tuple[str, ...] = ()

    def __init__(self, mlm: nn.Module):
        self.mlm = mlm

    # -- structure
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def position_offset(self) -> int:
        """The position id of a span's first token."""
        return 0

    @property
    def max_positions(self) -> int:
        """The longest span, special tokens included, that the positions cover."""
        return self.mlm.config.max_position_embeddings - self.position_offset

    def head_layers(self, n: int) -> nn.ModuleList:
        """n new layers of the family's own class for the Condenser head, initialised as the backbone's."""
        raise NotImplementedError

    def head_norm(self) -> Optional[nn.Module]:
        """A norm after the head's last layer where the family's last layer is followed by one (pre-norm
        families): the MLM transform then reads states as it was trained on. None for post-norm families."""
        return None

    def copy_into_head(self, head: nn.ModuleList, norm: Optional[nn.Module]) -> None:
        """--head_init copy: the head's layers (and norm) from the backbone's last ones."""
        for head_layer, layer in zip(head, self.layers[len(self.layers) - len(head):]):
            head_layer.load_state_dict(layer.state_dict())

    def mlm_parts(self) -> tuple[Callable, nn.Linear]:
        """(transform, decoder) of the MLM head: its logits are decoder(transform(states))."""
        raise NotImplementedError

    def compile_parts(self, compile_module: Callable) -> None:
        """The modules torch.compile wraps in place (embeddings, layers, the MLM transform)."""
        raise NotImplementedError

    # -- computing
    def embed(self, input_ids: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Token states entering the first layer, [R, P, H], each token at its position in its span."""
        raise NotImplementedError

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows) -> torch.Tensor:
        """One layer over whole rows, each span attending to itself only."""
        raise NotImplementedError

    def run_layer_at(self, layer: nn.Module, hidden: torch.Tensor, rows: Rows, at) -> torch.Tensor:
        """One layer's output at the `at.want` slots only (a `packing.PartialLayer`), [M, H]: keys and values
        from every slot, queries and everything after the attention at the wanted slots."""
        raise NotImplementedError

    def final(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output as the backbone returns it (after its final norm, where it has one)."""
        return hidden

    def encode_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """The plain HF computation over padded rows: (each layer's states, embeddings first; the backbone's
        output, what AutoModel returns)."""
        out = self.mlm.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states, out.last_hidden_state
