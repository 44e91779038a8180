"""`cache_tools build-cache` options: one dataclass, parsed by `transformers.HfArgumentParser` like `distill.train`'s
options (every flag accepts both spellings, ``--top-k`` and ``--top_k``), and checked here before anything is loaded
or written (bad input = one-line `BuildError`, exit 2, nothing written)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from cache_tools.format import chat_data, schema
from cache_tools.format.errors import BuildError

DEFAULT_TOP_K = 256
DEFAULT_SAMPLES = 64
# `--encoding auto` per target kind (measurements: docs/RESULTS.md, sections 5 and 12). Sampled: compact is lossless
# and its loader keeps up with the fp16 top-k loader. Top-k: compact is several times smaller, but decoding 256 ids
# and levels per position keeps its loader below the fp16 layout's tokens/s on CPU workers, so it stays opt-in.
AUTO_ENCODING = "auto"
AUTO_ENCODINGS = {"topk": "fp16", "sampled": "compact"}


@dataclass
class BuildOptions:
    teacher: str = field(metadata={"help": "hub id or local model folder"})
    dataset: str = field(metadata={"help": "local file/folder, save_to_disk folder or hub name[:config]"})
    output: str = field(metadata={"help": "cache folder to write"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer source; None = the teacher's"})
    allow_tokenizer_mismatch: bool = field(
        default=False, metadata={"help": "accept a --tokenizer whose ids the teacher reads as other tokens (checked: "
                                         "head rows, special tokens, a probe text)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model/tokenizer code"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    max_samples: int | None = field(default=None, metadata={"help": "use only the first N documents"})
    streaming: bool = field(default=False, metadata={"help": "stream the dataset instead of materialising it"})
    max_length: int = field(default=512, metadata={"help": "tokens per window"})
    dataset_format: Literal[chat_data.ROW_FORMATS] = field(  # type: ignore[valid-type]
        default="auto", metadata={"help": "row format (TRL naming): messages column, prompt + completion columns, or "
                                          "plain text; auto = from the columns"})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template FILE to render conversations (default: the teacher "
                                        "tokenizer's)"})
    chat_template_kwargs: str = field(
        default="{}", metadata={"help": "JSON object passed to apply_chat_template, e.g. '{\"enable_thinking\": "
                                        "false}'"})
    all_positions: bool = field(
        default=False, metadata={"help": "conversations: store teacher targets at every position (default: only "
                                         "where the next token is assistant content)"})
    packing: Literal["auto", "isolated", "cross_document"] = field(
        default="auto", metadata={"help": "isolated: packed documents never attend to each other in the teacher; "
                                          "auto = isolated (conversations are always isolated)"})
    long_conversations: Literal["split", "skip"] = field(
        default="split", metadata={"help": "a conversation longer than --max-length: split across windows (masks "
                                           "carried) or skip it; counted either way"})
    targets: Literal["topk", "sampled"] = field(
        default="topk", metadata={"help": "topk: K most likely tokens + exact tail mass; sampled: N draws from the "
                                          "teacher per position, stored as distinct ids + counts (RS-KD)"})
    top_k: int | None = field(default=None, metadata={"help": f"K for --targets topk (default {DEFAULT_TOP_K})"})
    samples: int | None = field(
        default=None, metadata={"help": f"N draws per position for --targets sampled (default {DEFAULT_SAMPLES})"})
    sample_temperature: float = field(default=1.0, metadata={"help": "temperature the samples are drawn at"})
    seed: int = field(default=0, metadata={"help": "sampling seed (with the global sequence index: resume- and "
                                                   "rank-independent)"})
    encoding: Literal["auto", "fp16", "compact"] = field(
        default="auto", metadata={"help": "fp16: plain arrays; compact: one packed blob per sequence (several times "
                                          "smaller top-k, lossless sampled); auto: compact for sampled targets, fp16 "
                                          "for top-k (whose compact decoding is the slower loader)"})
    pool_layers: list[int] = field(
        default_factory=lambda: [-1],
        metadata={"help": "hidden_states indices to mean-pool (0 = embeddings, -1 = last layer); space or comma "
                          "separated"})
    batch_size: int = field(default=8, metadata={"help": "windows per teacher forward"})
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = field(default="auto", metadata={"help": "teacher compute dtype"})
    shard_size: int = field(default=1024, metadata={"help": "sequences per shard"})
    compression: Literal["none", "lzf"] = field(default="none", metadata={"help": "HDF5 filter for array datasets"})
    resume: bool = field(default=False, metadata={"help": "keep finished shards of an interrupted build"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing cache in --output"})
    device: str | None = field(
        default=None, metadata={"help": "torch device (default: cuda:LOCAL_RANK if available, else cpu)"})
    progress: bool = field(default=True, metadata={"help": "progress bar (--no-progress: none)"})

    def __post_init__(self) -> None:
        # `--pool-layers 8,16,-1` arrives as one token per comma group (see `add_build_arguments`): flatten.
        flat: list[int] = []
        for item in self.pool_layers:
            flat.extend(item if isinstance(item, list) else [item])
        self.pool_layers = flat


def _pool_layers_token(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers (e.g. -1 or 8,16,-1)") from err


def _raise_usage_error(message: str) -> None:
    raise BuildError(f"invalid command line: {message}; see `cache_tools build-cache --help`")


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """Give `parser` (an HfArgumentParser built over `BuildOptions`) our comma-list parsing and one-line errors."""
    for action in parser._actions:  # noqa: SLF001 - argparse offers no public way to change one argument's type
        if action.dest == "pool_layers":
            action.type = _pool_layers_token
    parser.error = _raise_usage_error  # type: ignore[method-assign]


def targets_info(opts: BuildOptions) -> schema.TargetsInfo:
    """Check the target flags together (one line naming the flag on a conflict) and return the manifest record."""
    if opts.targets not in schema.TARGET_KINDS:
        raise BuildError(f"--targets {opts.targets}: use one of {', '.join(schema.TARGET_KINDS)}")
    if opts.encoding not in (AUTO_ENCODING, *schema.ENCODINGS):
        raise BuildError(f"--encoding {opts.encoding}: use one of {', '.join((AUTO_ENCODING, *schema.ENCODINGS))}")
    encoding = opts.encoding if opts.encoding != AUTO_ENCODING else AUTO_ENCODINGS[opts.targets]
    if opts.targets == "topk":
        if opts.samples is not None:
            raise BuildError(f"--samples {opts.samples} needs --targets sampled; drop it or pass --targets sampled")
        top_k = DEFAULT_TOP_K if opts.top_k is None else opts.top_k
        return schema.TargetsInfo(kind="topk", encoding=encoding, top_k=top_k, num_samples=0,
                                  sample_temperature=1.0, seed=0)
    if opts.top_k is not None:
        raise BuildError(f"--top-k {opts.top_k} with --targets sampled: sampled targets keep every distinct draw of "
                         "--samples N; drop --top-k")
    samples = DEFAULT_SAMPLES if opts.samples is None else opts.samples
    if samples < 1:
        raise BuildError(f"--samples {samples}: must be >= 1 (default {DEFAULT_SAMPLES})")
    if samples > schema.MAX_SAMPLES:
        raise BuildError(f"--samples {samples}: too large for the count dtype "
                         f"({schema.SAMPLE_COUNT_DTYPE.__name__}, at most {schema.MAX_SAMPLES}); lower --samples")
    if not opts.sample_temperature > 0:
        raise BuildError(f"--sample-temperature {opts.sample_temperature}: must be > 0")
    return schema.TargetsInfo(kind="sampled", encoding=encoding, top_k=0, num_samples=samples,
                              sample_temperature=float(opts.sample_temperature), seed=int(opts.seed))


def check_options(opts: BuildOptions) -> schema.TargetsInfo:
    """Every check that needs neither the teacher nor the dataset; returns the targets record."""
    for flag, value in (("--batch-size", opts.batch_size), ("--shard-size", opts.shard_size)):
        if value < 1:
            raise BuildError(f"{flag} {value}: must be >= 1")
    if opts.max_samples is not None and opts.max_samples < 1:
        raise BuildError(f"--max-samples {opts.max_samples}: must be >= 1 (omit it to use every document)")
    if opts.compression not in ("none", "lzf"):
        raise BuildError(f"--compression {opts.compression}: use none or lzf")
    if opts.resume and opts.overwrite:
        raise BuildError("--resume and --overwrite contradict each other; pass one")
    if opts.packing not in ("auto", *schema.PACKING_MODES):
        raise BuildError(f"--packing {opts.packing}: use auto, {' or '.join(schema.PACKING_MODES)}")
    if opts.long_conversations not in ("split", "skip"):
        raise BuildError(f"--long-conversations {opts.long_conversations}: use split or skip")
    if not opts.pool_layers:
        raise BuildError("--pool-layers: give at least one hidden_states index (default -1 = last layer)")
    return targets_info(opts)


def check_top_k(targets: schema.TargetsInfo, vocab: int) -> None:
    """The one check of --top-k, once the teacher's vocabulary is known: 1 <= K <= vocab (top-k targets only)."""
    if targets.kind == "topk" and not 1 <= targets.top_k <= vocab:
        raise BuildError(f"--top-k {targets.top_k}: must be between 1 and the vocabulary size ({vocab}); lower "
                         "--top-k")
