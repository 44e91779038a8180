"""`cache_tools` command line: build-cache, inspect, verify. `main` returns the exit status (0 = success)."""

from __future__ import annotations

import argparse
import json
import sys


def _pool_layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers (e.g. -1 or 8,16,-1)") from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cache_tools", description="Build, inspect and verify teacher caches.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build-cache", help="run the teacher over a dataset and write the sparse top-k cache")
    b.add_argument("--teacher", required=True, help="hub id or local model folder")
    b.add_argument("--dataset", required=True, help="local file/folder, save_to_disk folder or hub name[:config]")
    b.add_argument("--output", required=True, help="cache folder to write")
    b.add_argument("--tokenizer", default=None, help="tokenizer source (default: the teacher's)")
    b.add_argument("--trust-remote-code", action="store_true", help="allow custom model/tokenizer code")
    b.add_argument("--split", default="train")
    b.add_argument("--text-column", default="text")
    b.add_argument("--max-samples", type=int, default=None, help="use only the first N documents")
    b.add_argument("--streaming", action="store_true", help="stream the dataset instead of materialising it")
    b.add_argument("--max-length", type=int, default=512, help="tokens per window")
    b.add_argument("--top-k", type=int, default=256)
    b.add_argument("--pool-layers", type=_pool_layers, default=[-1],
                   help="hidden_states indices to mean-pool (0 = embeddings, -1 = last layer); comma separated")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default="auto")
    b.add_argument("--shard-size", type=int, default=1024, help="sequences per shard")
    b.add_argument("--compression", choices=["none", "lzf"], default="none")
    b.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = b.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted build")
    group.add_argument("--overwrite", action="store_true", help="replace an existing cache in --output")

    i = sub.add_parser("inspect", help="summarise a cache")
    i.add_argument("cache_dir")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    v = sub.add_parser("verify", help="check a cache's checksums, layout and numbers")
    v.add_argument("cache_dir")
    return parser


def _build(args: argparse.Namespace) -> int:
    from cache_tools.builder import BuildOptions, build_cache

    opts = BuildOptions(
        teacher=args.teacher, dataset=args.dataset, output=args.output, tokenizer=args.tokenizer,
        trust_remote_code=args.trust_remote_code, split=args.split, text_column=args.text_column,
        max_samples=args.max_samples, streaming=args.streaming, max_length=args.max_length, top_k=args.top_k,
        pool_layers=args.pool_layers, batch_size=args.batch_size, dtype=args.dtype, shard_size=args.shard_size,
        compression=args.compression, resume=args.resume, overwrite=args.overwrite, device=args.device,
        progress=not args.no_progress,
    )
    build_cache(opts)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cache_tools.inspect_cache import cache_summary, format_summary

    summary = cache_summary(args.cache_dir)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        print(format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cache_tools.verify import verify_cache

    faults = verify_cache(args.cache_dir)
    if faults:
        for fault in faults:
            print(f"cache_tools verify: {args.cache_dir}: {fault}", file=sys.stderr)
        return 2  # the one exit status of every expected failure
    print(f"cache_tools verify: {args.cache_dir}: OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cache_tools.errors import UserError
    from cache_tools.teacher import BuildError

    handlers = {"build-cache": _build, "inspect": _inspect, "verify": _verify}
    try:
        return handlers[args.command](args)
    except (BuildError, UserError, ValueError) as err:
        print(f"cache_tools {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # disk full, permissions, a path that is a file: one line, not a traceback
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        print(f"cache_tools {args.command}: error: {lines[-1]} (check the paths and free space)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cache_tools {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
