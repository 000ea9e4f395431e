"""The training recipe: typed sections (where things are, model, data, batch layout, optimisation, compute,
evaluation, checkpoints, job), read from flags and YAML, and every rule about their combinations.

The flags are the reference implementation's (luyug/Condenser, OpenMatch/COCO-DR) with their meaning, so
an existing command line keeps working: every field is one flag, named as in the reference and unique
across sections. A YAML recipe gives the same names, at the top level or under their section's name
(`optim: {learning_rate: 1e-4}`); the command line wins over the YAML file. Every rule about how values
combine lives here: `validate` (the recipe alone), `for_engine` (with the launched engine) and
`validate_against_model` (with the backbone's config).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence


class ConfigError(ValueError):
    """A recipe value that cannot work; the message names the field and the fix."""


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class IOConfig:
    """Where things are: the run folder, the warm start, the training data."""

    output_dir: str = _f(None, "Run folder: final export at the top, checkpoint-STEP/ and metrics.jsonl inside.")
    model_name_or_path: str = _f(None, "Warm start: an HF masked-LM folder, one of our exports, or a reference Condenser folder.")
    train_dir: str = _f(None, "Training data: a folder written by `python -m coco_accel.preprocess`.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty --output_dir.")
    do_train: bool = _f(True, "Accepted for compatibility with reference commands; this entry point always trains.")
    model_type: Optional[str] = _f(None, "Expected backbone family (bert, roberta, ...); checked against the checkpoint's config.")


@dataclass
class ModelConfig:
    """The Condenser's shape and the contrastive score."""

    n_head_layers: int = _f(2, "Transformer layers in the Condenser head.")
    skip_from: int = _f(6, "Backbone layer whose token states feed the head (0 = embeddings; 6 for BERT-base).")
    strict_head: bool = _f(False, "Refuse to start when the warm start has no Condenser head (a random head harms continued pretraining).")
    head_init: Literal["random", "copy"] = _f(
        "random", "How the head starts when the warm start has none: random (the backbone's own initialisation, as "
        "in the reference) or copy (of the backbone's last n_head_layers layers).")
    reference_backbone_without_dropout: bool = _f(
        False, "Reproduce the reference's hidden lm.eval() in forward: no dropout in the backbone (the head keeps "
        "its own). Off by default: it was a defect, not a recipe choice.")
    late_mlm: bool = _f(False, "Add the backbone's own MLM loss on its last layer to the head MLM loss.")
    pooling: Literal["cls", "mean"] = _f(
        "cls", "A span's vector, which the contrastive loss trains, the head reads in CLS's place and the export's "
        "sentence-transformers config pools: cls (the last layer's CLS, as coCondenser and COCO-DR) or mean (of the "
        "span's last-layer tokens, as ModernBERT embedders pool).")
    temperature: float = _f(1.0, "Contrastive logits are divided by this (1.0 = the reference's plain dot product).")
    normalize: bool = _f(False, "L2-normalise CLS vectors before the contrastive dot product.")


@dataclass
class DataConfig:
    """Spans, masking and how many documents make a batch."""

    max_seq_length: int = _f(128, "Longest span in tokens, [CLS] and [SEP] included; longer spans are cut at a random window.")
    mlm_probability: float = _f(0.15, "Share of tokens masked, by whole words, with 80/10/10 replacement.")
    whole_word_mask: bool = _f(True, "Mask whole words, from the tokenizer's own word boundaries (WordPiece's '##', "
                               "byte-level BPE's 'Ġ', SentencePiece's '▁'); false: single tokens, for a tokenizer "
                               "that marks none.")
    per_device_train_batch_size: int = _f(8, "DOCUMENTS per process per step; each gives two spans.")
    global_batch_size: int = _f(0, "DOCUMENTS per step over all processes (0 = per-device size x processes); "
                                "when set, the per-device size is derived from it.")
    dataloader_drop_last: bool = _f(False, "Drop the short last global batch of each epoch.")
    dataloader_num_workers: int = _f(0, "Data-loading worker processes per training process.")


@dataclass
class LayoutConfig:
    """How a batch's spans meet the encoder: packed rows, or rows grouped by length."""

    pack_length: int = _f(128, "Encode all spans in ONE call, packed into rows of this many tokens with block-diagonal "
                          "attention and per-span positions: no padding, exact per span (0 = length buckets "
                          "instead).")
    length_bucket_width: int = _f(8, "Encode rows grouped by length rounded up to this many tokens, each group "
                                  "cut to its longest row (0 = pad the batch to its longest row).")
    length_bucket_call_cost: int = _f(-1, "Padding tokens one more encoder call is worth: neighbouring length buckets "
                                      "are merged where that costs less (-1 = auto: 8192 on GPU, 64 on CPU; 0 = never "
                                      "merge).")


@dataclass
class OptimConfig:
    """The optimizer, its schedule and the run's length."""

    optimizer: Literal["adamw", "sgd"] = _f(
        "adamw", "adamw (the recipe's), or sgd: plain gradient descent without momentum, for checks (a step moves "
        "each weight by exactly -lr x its gradient, so runs compare by gradients).")
    learning_rate: float = _f(5e-5, "Peak learning rate of AdamW.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    warmup_ratio: float = _f(0.0, "Share of total steps spent in linear warm-up.")
    warmup_steps: int = _f(0, "Warm-up steps; wins over --warmup_ratio when > 0.")
    max_grad_norm: float = _f(1.0, "Gradient clipping by global norm; 0 turns it off.")
    num_train_epochs: float = _f(3.0, "Epochs over the documents (ignored when --max_steps > 0).")
    max_steps: int = _f(-1, "Total optimizer steps; > 0 wins over --num_train_epochs.")
    gradient_accumulation_steps: int = _f(1, "Must stay 1: see --cache_chunk_size for large contrastive batches.")


@dataclass
class ComputeConfig:
    """Memory, compilation and precision."""

    cache_chunk_size: int = _f(-1, "Gradient cache: encode the local batch in chunks of at most this many spans, >= 2 (-1 = off).")
    torch_compile: bool = _f(False, "torch.compile the backbone, the head and the MLM transform (dynamic shapes): a little faster "
                             "and leaner at large batches (docs/performance.md); the first step compiles (~1 min).")
    fp16: bool = _f(False, "fp16 mixed precision (prefer setting it in the accelerate config).")
    bf16: bool = _f(False, "bf16 mixed precision (prefer setting it in the accelerate config).")


@dataclass
class EvaluationConfig:
    """Evaluation during training: the held-out signal and retrieval on BEIR folders."""

    eval_steps: int = _f(0, "Every this many steps, the held-out contrastive loss and accuracy per corpus "
                         "(needs --eval_fraction at preprocessing; 0 = off).")
    eval_max_docs: int = _f(1024, "Held-out documents scored per corpus at each evaluation.")
    eval_data: Optional[list] = _f(None, "BEIR folders (corpus.jsonl, queries.jsonl, qrels/) whose zero-shot retrieval "
                                   "(nDCG@10, Recall@100, MRR@10) is measured at step 0, every --eval_steps and at the "
                                   "end, with the protocol of `python -m coco_accel.evaluation`.")
    eval_split: str = _f("test", "qrels split of --eval_data.")
    eval_pooling: Optional[Literal["cls", "mean"]] = _f(None, "Pooling of --eval_data's vectors (default: --pooling).")
    eval_score: Literal["dot", "cos"] = _f("dot", "Scoring of --eval_data (dot product or cosine).")
    eval_query_max_len: int = _f(64, "Query tokens kept for --eval_data.")
    eval_doc_max_len: int = _f(128, "Document tokens kept for --eval_data.")
    eval_batch_size: int = _f(128, "Texts encoded at a time for --eval_data.")


@dataclass
class CheckpointConfig:
    """Checkpoints and resuming."""

    save_steps: int = _f(500, "Write checkpoint-STEP/ every this many steps (0 = never).")
    save_total_limit: int = _f(0, "Keep only the newest this many checkpoints (0 = keep all).")
    resume: str = _f("auto", "auto: continue from the newest complete checkpoint in --output_dir if any; "
                     "none: start fresh; or a checkpoint folder.")
    resume_allow_changed_data: bool = _f(False, "Resume although the checkpoint was made from another --train_dir or "
                                         "tokenizer (global batch and seed must still match).")


@dataclass
class JobConfig:
    """The job: seed, logging, trackers, faults."""

    seed: int = _f(42, "Seeds document order, span choice, masking and model init.")
    logging_steps: int = _f(10, "Write a metrics.jsonl line every this many steps.")
    peak_tflops: float = _f(0.0, "One GPU's peak TFLOP/s for the logged MFU (0 = known under bf16/fp16: 989 for "
                            "H100/H200, 312 for A100; otherwise MFU is not logged, model TFLOP/s still is).")
    report_to: str = _f("tensorboard", "Trackers beside metrics.jsonl: tensorboard, wandb, all (those installed), or none.")
    max_nonfinite_skips: int = _f(0, "Skip up to this many steps whose loss is not finite (0 = stop at the first).")
    ddp_timeout: int = _f(1800, "Seconds a collective may wait before the job fails (a dead rank ends the job).")


# The sections, by attribute name and --help title. A field with a fixed set of values is typed
# Literal[...]: the parser accepts exactly those.
SECTIONS: dict[str, tuple[type, str]] = {
    "io": (IOConfig, "where things are"), "model": (ModelConfig, "model"), "data": (DataConfig, "data and batches"),
    "layout": (LayoutConfig, "batch layout"), "optim": (OptimConfig, "optimisation"),
    "compute": (ComputeConfig, "compute"), "evaluation": (EvaluationConfig, "evaluation during training"),
    "checkpoints": (CheckpointConfig, "checkpoints and resuming"), "job": (JobConfig, "job"),
}


def _section_of() -> dict[str, str]:
    """flag name -> the section holding it."""
    return {f.name: name for name, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)}


@dataclass
class TrainConfig:
    """The recipe, in sections: `cfg.optim.learning_rate`, `cfg.data.per_device_train_batch_size`, ..."""

    io: IOConfig = field(default_factory=IOConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    job: JobConfig = field(default_factory=JobConfig)

    @classmethod
    def from_flags(cls, **values: Any) -> "TrainConfig":
        """A recipe from flag names (the reference's, flat): TrainConfig.from_flags(learning_rate=1e-4, ...)."""
        where = _section_of()
        unknown = sorted(set(values) - set(where))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(where), n=1)
            raise ConfigError(f"unknown field '{unknown[0]}'." + (f" Did you mean '{close[0]}'?" if close else ""))
        parts = {name: cls_(**{k: v for k, v in values.items() if where[k] == name})
                 for name, (cls_, _) in SECTIONS.items()}
        return cls(**parts)

    @classmethod
    def field_names(cls) -> list[str]:
        return list(_section_of())

    def flags(self) -> dict[str, Any]:
        """Every field by its flag name, flat: what the trackers and a checkpoint's provenance record."""
        return {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}

    def sections(self) -> dict[str, dict[str, Any]]:
        """Every field under its section: the run folder's train_config.json, itself a valid --config."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **values: Any) -> "TrainConfig":
        """A copy with some fields changed, by flag name."""
        return TrainConfig.from_flags(**{**self.flags(), **values})

    def validate(self) -> "TrainConfig":
        """Check the recipe as a whole; raise ConfigError naming the field and the fix."""
        flags = self.flags()
        for name in ("output_dir", "model_name_or_path", "train_dir"):
            if not flags[name]:
                raise ConfigError(f"--{name} is required (set it on the command line or in the --config YAML).")
        for name, choices in _choices().items():
            if flags[name] not in choices and not (flags[name] is None and name in _optional_fields()):
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}; got {flags[name]!r}.")
        positive = ("per_device_train_batch_size", "max_seq_length", "logging_steps", "n_head_layers",
                    "gradient_accumulation_steps")
        for name in positive:
            if flags[name] < 1:
                raise ConfigError(f"--{name} must be >= 1, got {flags[name]}.")
        if self.data.max_seq_length < 4:
            raise ConfigError(f"--max_seq_length must be >= 4 ([CLS] + tokens + [SEP]), got {self.data.max_seq_length}.")
        if not 0.0 < self.data.mlm_probability < 1.0:
            raise ConfigError(f"--mlm_probability must be in (0, 1), got {self.data.mlm_probability}.")
        if not 0.0 <= self.optim.warmup_ratio <= 1.0:
            raise ConfigError(f"--warmup_ratio must be in [0, 1], got {self.optim.warmup_ratio}.")
        if self.model.temperature <= 0:
            raise ConfigError(f"--temperature must be > 0, got {self.model.temperature}.")
        if self.compute.fp16 and self.compute.bf16:
            raise ConfigError("--fp16 and --bf16 are both set: choose one (or set mixed_precision in the accelerate config).")
        if self.optim.max_steps <= 0 and self.optim.num_train_epochs <= 0:
            raise ConfigError("Set --max_steps > 0 or --num_train_epochs > 0: as given the run has no steps.")
        if self.model.skip_from < 0:
            raise ConfigError(f"--skip_from must be >= 0 (0 = embeddings), got {self.model.skip_from}.")
        if self.compute.cache_chunk_size in (0, 1) or self.compute.cache_chunk_size < -1:
            # Every process must run as many chunks as the others (ZeRO-2 reduces at each backward), so a
            # process one document short makes smaller chunks: that needs chunks of two spans or more.
            raise ConfigError(f"--cache_chunk_size must be -1 (off) or >= 2 spans, got {self.compute.cache_chunk_size}.")
        if self.optim.gradient_accumulation_steps > 1:
            raise ConfigError(
                f"--gradient_accumulation_steps {self.optim.gradient_accumulation_steps}: accumulation cannot emulate a "
                "large contrastive batch (each micro-batch would only see its own spans as negatives). Keep it at 1 "
                "and raise --per_device_train_batch_size, using --cache_chunk_size K to fit it in memory.")
        if self.layout.length_bucket_call_cost < -1:
            raise ConfigError("--length_bucket_call_cost must be -1 (auto) or >= 0, got "
                              f"{self.layout.length_bucket_call_cost}.")
        for name in ("save_total_limit", "max_nonfinite_skips", "learning_rate", "weight_decay", "warmup_steps",
                     "peak_tflops", "dataloader_num_workers", "max_grad_norm", "length_bucket_width", "pack_length",
                     "global_batch_size", "save_steps"):
            if flags[name] < 0:
                raise ConfigError(f"--{name} must be >= 0, got {flags[name]}.")
        if self.evaluation.eval_steps < 0 or self.evaluation.eval_max_docs < 2:
            raise ConfigError("--eval_steps must be >= 0 and --eval_max_docs >= 2.")
        for name in ("eval_query_max_len", "eval_doc_max_len", "eval_batch_size"):
            if flags[name] < (3 if name != "eval_batch_size" else 1):
                raise ConfigError(f"--{name} must be at least {3 if name != 'eval_batch_size' else 1}, got "
                                  f"{flags[name]}.")
        if self.job.ddp_timeout < 1:
            raise ConfigError(f"--ddp_timeout must be >= 1 second, got {self.job.ddp_timeout}.")
        return self

    def per_device_docs(self, world_size: int) -> int:
        """Documents per process, from --global_batch_size when set."""
        if not self.data.global_batch_size:
            return self.data.per_device_train_batch_size
        if self.data.global_batch_size % world_size:
            lower = self.data.global_batch_size // world_size * world_size
            raise ConfigError(
                f"--global_batch_size {self.data.global_batch_size} is not divisible by the {world_size} processes: "
                f"use {lower} or {lower + world_size}, or set --per_device_train_batch_size instead.")
        return self.data.global_batch_size // world_size

    def for_engine(self, zero_stage: Optional[int]) -> "TrainConfig":
        """The recipe as the launched engine runs it (zero_stage: DeepSpeed's ZeRO stage, None for DDP or one
        process): the engine's refusals, and its one change, made here so that the recipe recorded with the
        run is the one that ran."""
        if zero_stage is None:
            return self
        if zero_stage == 3 and self.evaluation.eval_data:
            raise ConfigError("--eval_data is not available under ZeRO-3: its parameters are gathered per module call, "
                              "and the processes encode different numbers of batches. Use ZeRO-1/2, or evaluate "
                              "the export with `python -m coco_accel.evaluation`.")
        if self.job.max_nonfinite_skips:
            raise ConfigError("--max_nonfinite_skips is not available under DeepSpeed: it applies the update inside "
                              "backward, before the loss can be checked (its fp16 loss scaler skips overflow steps "
                              "itself). Drop the flag, or use DDP.")
        if zero_stage == 3 and self.compute.cache_chunk_size > 0:
            raise ConfigError("--cache_chunk_size with ZeRO-3 is not supported: stage 3 gathers parameters per "
                              "forward, and the cached re-encoding would gather them once per chunk. Use ZeRO-1/2.")
        if zero_stage == 3 and self.layout.length_bucket_width and not self.layout.pack_length:
            # ZeRO-3 gathers each module's parameters collectively at every call, so every process must call
            # the encoder equally often; the number of length buckets differs between processes.
            logging.getLogger(__name__).info("ZeRO-3: length buckets off (--length_bucket_width 0); rows pad to "
                                             "the batch's longest.")
            return self.replace(length_bucket_width=0)
        return self

    def validate_against_model(self, num_layers: int, model_type: str, positions: Optional[int] = None) -> None:
        """Checks that need the backbone's config; positions: the longest input it can embed."""
        if positions is not None and self.data.max_seq_length > positions:
            raise ConfigError(f"--max_seq_length {self.data.max_seq_length} is longer than {self.io.model_name_or_path} "
                              f"can embed ({positions} positions): use --max_seq_length {positions} or less.")
        if self.model.skip_from > num_layers:
            raise ConfigError(
                f"--skip_from {self.model.skip_from} is beyond the backbone's {num_layers} layers: "
                f"use a value in 0..{num_layers} (the reference recipe uses 6 for a 12-layer BERT-base).")
        if self.io.model_type and self.io.model_type != model_type:
            raise ConfigError(
                f"--model_type {self.io.model_type} but {self.io.model_name_or_path} is a '{model_type}' model: "
                f"drop --model_type or set it to {model_type}.")


# ---------------------------------------------------------------------------------------------------------
# parsing

_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}


def _to_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _to_int(value: Any) -> int:
    """An integer from YAML or text: 8, 8.0, "8" or 1e3, never a silent cut of 8.9 (nor true as 1)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, int):
        return value
    number = float(value)
    if not number.is_integer():
        raise ValueError("not a whole number")
    return int(number)


def _base_type(tp: Any) -> type:
    """Optional[int] -> int; 'int' (from __future__ annotations) resolved by the caller."""
    if typing.get_origin(tp) is not typing.Union:  # Literal[...] keeps its choices
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _field_types() -> dict[str, type]:
    """Every flag's type, over all sections."""
    types = {}
    for cls, _ in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        types.update({f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)})
    return types


def _optional_fields() -> set[str]:
    """The fields typed Optional[...]: None is one of their values."""
    return {f.name for cls, _ in SECTIONS.values() for f in dataclasses.fields(cls)
            if type(None) in typing.get_args(typing.get_type_hints(cls)[f.name])}


def _type_name(tp: Any) -> str:
    return f"one of {', '.join(typing.get_args(tp))}" if typing.get_origin(tp) is Literal else tp.__name__


def _choices() -> dict[str, tuple]:
    """The fields whose values are a fixed set (typed Literal[...]), with their choices."""
    return {name: typing.get_args(tp) for name, tp in _field_types().items() if typing.get_origin(tp) is Literal}


def _int_flag(text: str) -> int:
    try:
        return _to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that names the fix: close matches for unknown flags."""

    def error(self, message: str) -> typing.NoReturn:  # argparse's own hook
        raise ConfigError(f"{message}\nRun with --help to list every flag.")


def build_parser(prog: str = "coco_accel/train.py") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Continuous contrastive (coCondenser / COCO-DR) pretraining.",
                     argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="Recipe YAML; its keys are these flags' names. The command line wins.")
    types = _field_types()
    for cls, title in SECTIONS.values():
        _add_section(parser.add_argument_group(title, cls.__doc__), cls, types)
    return parser


def _add_section(grp: argparse._ArgumentGroup, cls: type, types: dict[str, type]) -> None:
    for f in dataclasses.fields(cls):
        tp = types[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if tp is bool:
            grp.add_argument(f"--{f.name}", type=_to_bool, nargs="?", const=True, metavar="BOOL", help=help_text)
        elif tp is list:
            grp.add_argument(f"--{f.name}", type=str, nargs="+", metavar="DIR", help=help_text)
        elif tp is int:
            grp.add_argument(f"--{f.name}", type=_int_flag, metavar="INT", help=help_text)
        elif typing.get_origin(tp) is Literal:
            grp.add_argument(f"--{f.name}", type=str, choices=typing.get_args(tp), help=help_text)
        else:
            grp.add_argument(f"--{f.name}", type=tp, help=help_text)


def _coerce_yaml(data: dict, source: str) -> dict:
    """A YAML recipe -> {flag: value}: flags at the top level, or under their section's name."""
    types, where = _field_types(), _section_of()
    flat = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            wrong = [k for k in value if where.get(k, key) != key]
            if wrong:
                raise ConfigError(f"{source}: key '{wrong[0]}' under '{key}' belongs to section '{where[wrong[0]]}'.")
            flat.update({k: (v, f"{key}.{k}") for k, v in value.items()})
        else:
            flat[key] = (value, key)
    return {key: _coerce_value(types, key, value, source, shown) for key, (value, shown) in flat.items()}


def _coerce_value(types: dict[str, type], key: str, value: Any, source: str, shown: str) -> Any:
    if key not in types:
        close = difflib.get_close_matches(key, list(types) + list(SECTIONS), n=1)
        raise ConfigError(f"{source}: unknown key '{shown}'.{f' Did you mean {close[0]!r}?' if close else ''}")
    tp, where = types[key], f"{source}: key '{shown}'"
    if value is None and key in _optional_fields():  # null: the default's "not set", as a recorded recipe has it
        return None
    if value is None:
        raise ConfigError(f"{where} has no value: give it one ({_type_name(tp)}) or delete the line.")
    try:
        if tp is list:
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) and v for v in items):
                raise ValueError("expected a list of paths")
            return items
        if tp is bool:
            return value if isinstance(value, bool) else _to_bool(value)
        if tp is int:
            return _to_int(value)
        if typing.get_origin(tp) is Literal:
            if value not in typing.get_args(tp):
                raise ValueError("not one of the choices")
            return value
        return tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{where} expects {_type_name(tp)}, got {value!r} ({err}).") from None


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags and an optional --config YAML -> a validated TrainConfig."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u for u in unknown if u.startswith("-")]
        bad = flags[0] if flags else unknown[0]
        close = difflib.get_close_matches(bad.lstrip("-"), TrainConfig.field_names() + ["config"], n=1)
        hint = f" Did you mean --{close[0]}?" if close else " Run with --help to list every flag."
        raise ConfigError(f"unknown argument '{bad}'.{hint}")
    values: dict[str, Any] = {}
    cfg_path = getattr(args, "config", None)
    if cfg_path:
        path = Path(cfg_path)
        if not path.is_file():
            raise ConfigError(f"--config {cfg_path}: no such file.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {cfg_path}:{where}: not valid YAML ({problem}). Each line is "
                              "`flag_name: value`.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {cfg_path}: cannot be read ({err}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_path}: expected a mapping of flag names (or sections of them) to values at the "
                              "top level.")
        values.update(_coerce_yaml(data, str(cfg_path)))
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    if "per_device_train_batch_size" in flags and "global_batch_size" not in flags:
        values.pop("global_batch_size", None)  # the command line's batch size replaces the recipe's, of either kind
    values.update(flags)
    return TrainConfig.from_flags(**values).validate()
