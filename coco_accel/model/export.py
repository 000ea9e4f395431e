"""The export: an HF folder that `transformers.AutoModel` loads, the Condenser head beside it, and the
files sentence-transformers reads, set to the COCO-DR protocol (the model's pooling, CLS by default, dot
product, no normalisation), so BEIR and MTEB tools evaluate it as it is."""

from __future__ import annotations

import inspect
import json
import os
from typing import Optional

from coco_accel.model.condenser import Condenser
from coco_accel.model.warm_start import HEAD_FILE

# sentence-transformers' own file names and module types
ST_MODULES = "modules.json"
ST_POOLING_DIR = "1_Pooling"


def save_export(model: Condenser, tokenizer, output_dir: str, state_dict: Optional[dict] = None) -> None:
    """HF folder that AutoModel loads (backbone + its MLM head), tokenizer, and the Condenser head beside it.

    `state_dict` is the full Condenser state (gathered from ZeRO shards by the caller) when the
    parameters live elsewhere; by default the model's own.
    """
    from safetensors.torch import save_file

    state = state_dict if state_dict is not None else model.state_dict()
    os.makedirs(output_dir, exist_ok=True)
    # Tied weights (the MLM decoder is the word embedding) are written once, whoever gathered the state.
    first_name: dict[int, str] = {}
    tied_copies = set()
    for name, param in model.mlm.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied_copies.add(name)
        else:
            first_name[id(param)] = name
    mlm_state = {k[len("mlm."):]: v for k, v in state.items()
                 if k.startswith("mlm.") and k[len("mlm."):] not in tied_copies}
    mlm_state.update(_base_model_extras(model.mlm, mlm_state))
    # Save the names the model uses now: by default transformers reverts load-time renames (LayerNorm
    # weight/bias back to a legacy checkpoint's gamma/beta), which happened under ZeRO-3.
    as_is = {"save_original_format": False} if "save_original_format" in inspect.signature(
        model.mlm.save_pretrained).parameters else {}
    model.mlm.save_pretrained(output_dir, state_dict=mlm_state, **as_is)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    head = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(("c_head.", "c_head_norm."))}
    save_file(head, os.path.join(output_dir, HEAD_FILE))
    write_sentence_transformers_files(output_dir, model.config.hidden_size, model.max_positions, pooling=model.pooling)


def _base_model_extras(mlm, mlm_state: dict) -> dict:
    """The weights `AutoModel`'s class has and a masked-LM checkpoint lacks (BERT's and RoBERTa's pooler),
    initialised as transformers initialises them, from a fixed seed and without touching the caller's
    random streams: `AutoModel.from_pretrained(export)` then reports nothing missing or newly initialised
    (the CLS or mean pooling of the exports never reads a pooler). The class is built on the meta device
    (names only: no memory, and no ZeRO-3 partitioning, whose collectives the other processes would not
    join) and only the missing modules are made real."""
    import torch
    from transformers import AutoModel

    prefix = mlm.base_model_prefix
    have = {k[len(prefix) + 1:] for k in mlm_state if k.startswith(prefix + ".")}
    with torch.device("meta"):
        base = AutoModel._model_mapping[type(mlm.config)](mlm.config)
    missing = [k for k in base.state_dict() if k not in have]
    dtype = next(iter(mlm_state.values())).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for path in sorted({k.rpartition(".")[0] for k in missing}):
            module = base.get_submodule(path).to_empty(device="cpu")
            base._init_weights(module)
    state = base.state_dict()
    return {f"{prefix}.{k}": state[k].to(dtype) for k in missing}


def write_sentence_transformers_files(output_dir: str, hidden_size: int, max_positions: Optional[int],
                                      max_seq_length: int = 128, pooling: str = "cls") -> None:
    """modules.json (the HF model, then pooling), the model's pooling (cls or mean: the vector its
    contrastive loss trained), dot-product similarity, no Normalize module:
    `SentenceTransformer(output_dir)` then encodes as `python -m coco_accel.evaluation` does (documents cut at
    128 tokens; sentence-transformers keeps one length for queries and documents)."""
    length = min(max_seq_length, max_positions) if max_positions else max_seq_length
    files = {
        ST_MODULES: [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                     {"idx": 1, "name": "1", "path": ST_POOLING_DIR, "type": "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": {"max_seq_length": length, "do_lower_case": False},
        "config_sentence_transformers.json": {"similarity_fn_name": "dot", "prompts": {}, "default_prompt_name": None},
        os.path.join(ST_POOLING_DIR, "config.json"): {
            "word_embedding_dimension": hidden_size, "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True},
    }
    os.makedirs(os.path.join(output_dir, ST_POOLING_DIR), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "w", encoding="utf-8") as fh:
            json.dump(content, fh, indent=2)
            fh.write("\n")
