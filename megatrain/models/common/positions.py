"""Per-token positions and attention masks from what a batch carries (padding, documents)."""

from __future__ import annotations

import torch
from torch import Tensor

from megatrain.models.common.attention import AttnMask


def positions_in_documents(doc_ids: Tensor) -> Tensor:
    """(B, T) position of each token within its document: 0 where a new document id starts.

    Packed blocks hold several documents back to back; each should see positions as if it were
    alone, so position ids restart at every document boundary.
    """
    T = doc_ids.size(1)
    index = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)  # (B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_of_doc = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)
    return index - start_of_doc


def token_positions(input_ids: Tensor, doc_ids: Tensor | None) -> Tensor:
    """Indices into a learned position table: (T,) 0..T-1 for (B, T) ``input_ids``, or (B, T)
    restarting per document when ``doc_ids`` is given."""
    if doc_ids is None:
        return torch.arange(input_ids.size(1), device=input_ids.device)
    return positions_in_documents(doc_ids)


def batch_mask(attention_mask: Tensor | None, doc_ids: Tensor | None) -> AttnMask | None:
    """The :class:`AttnMask` of a batch: ``attention_mask`` (B, T) 1 for real tokens, 0 for
    padding (Hugging Face's convention), and/or ``doc_ids`` (B, T); None when neither is given."""
    if attention_mask is None and doc_ids is None:
        return None
    padding = None if attention_mask is None else attention_mask.bool()
    return AttnMask(key_padding=padding, doc_ids=doc_ids)
