"""``bmclip build-dataset``: PMC OA packages / article folders -> filtered, deduplicated, split shards.

Forms::

    bmclip build-dataset INPUT... --output DIR                    # stage + merge on this machine
    bmclip build-dataset INPUT... --staging S --num-slices N --slice K   # one slice (e.g. a Slurm task)
    bmclip build-dataset merge STAGING... --output DIR            # merge slices (also: --merge)

INPUTs and --output may be remote (fsspec; pip install 'bmclip[cloud]'): an object-store prefix
(s3://bucket/prefix/, gs://...) is listed and its packages are streamed, never copied to disk;
http(s):// inputs are single package tarballs. With a remote --output each finished shard (tar + .idx)
is uploaded at once and deleted locally, the JSON/PNG files at the end (manifest.json last); uploads
are retried with exponential backoff. --staging may be remote too (s3://bucket/run/_staging), and with
a remote --output it defaults to OUTPUT/_staging: staged chunks are uploaded from memory as they are
finished and read back one at a time, so a remote build needs local disk only for the few shards
waiting for upload (in TMPDIR). A local staging dir holds the staged samples (about the size of the
output). --output-storage-option applies to the output and the staging dir. Credentials and endpoints:
--storage-option KEY=VALUE, or the AWS_* environment variables s3fs honours (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bmclip.cli._text import plain_help
from bmclip.errors import ConfigError
from bmclip.io.fs import parse_storage_options


def register(subparsers) -> None:
    """Add the ``build-dataset`` subcommand to the bmclip CLI."""
    p = subparsers.add_parser(
        "build-dataset",
        help="build PMC figure-caption webdataset shards from PMC OA packages",
        description=plain_help(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="package tarballs, article folders or trees of them; local paths or URLs (s3://bucket/prefix/)")
    p.add_argument("--output", "-o",
                   help="output directory or remote prefix (s3://bucket/prefix/) for shards, manifest.json, "
                        "stats.json/png")
    p.add_argument("--merge", action="store_true", help="INPUTs are staging dirs to merge (same as 'merge')")
    p.add_argument("--staging",
                   help="staging dir: a local path or a remote prefix (s3://bucket/run/_staging); default "
                        "OUTPUT/_staging; required with --num-slices > 1")
    p.add_argument("--keep-staging", action="store_true", help="keep the staging dir after a full build")
    p.add_argument("--num-slices", type=int, default=1, help="split the packages into N disjoint slices")
    p.add_argument("--slice", type=int, default=0, help="which slice (0-based) this run stages")
    p.add_argument("--workers", "-j", type=int, default=None, help="worker processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("remote inputs and output (fsspec storage options; values are JSON or strings)")
    r.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="for remote inputs and output, e.g. endpoint_url=http://host:9000 (repeatable)")
    r.add_argument("--input-storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="for remote inputs only, e.g. anon=true for a public bucket (repeatable)")
    r.add_argument("--output-storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="for a remote output and remote staging dirs only (repeatable)")
    g = p.add_argument_group("image and caption filters (stage time)")
    g.add_argument("--max-side", type=int, default=512, help="resize so the longest side is at most this")
    g.add_argument("--jpeg-quality", type=int, default=90)
    g.add_argument(
        "--no-jpeg-passthrough",
        action="store_true",
        help="re-encode every figure, also JPEGs that already fit --max-side (default: stored as is)",
    )
    g.add_argument("--min-side", type=int, default=64, help="drop images whose shorter side is smaller")
    g.add_argument("--max-aspect", type=float, default=10.0, help="drop images with long/short side above")
    g.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb guard (w*h)")
    g.add_argument("--min-caption-chars", type=int, default=10)
    g.add_argument("--max-caption-chars", type=int, default=50_000,
                   help="skip figures whose caption is longer (caption_too_long), before it is tokenized or stored")
    g.add_argument("--use-gif", action="store_true", help="accept .gif files (PMC ships them as thumbnails)")
    g.add_argument("--no-subcaptions", action="store_true", help="do not split captions by panel labels")
    g.add_argument("--chunk-size", type=int, default=16, help="packages per staging chunk (resume unit)")
    m = p.add_argument_group("dedup, splits and shards (merge time)")
    m.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    m.add_argument("--near-dup-threshold", type=int, default=7,
                   help="dHash Hamming radius of near-duplicate candidates; -1 disables near-duplicate removal")
    m.add_argument("--near-dup-max-mad", type=float, default=2.0,
                   help="a candidate is a near duplicate when the 16x16 thumbnails' mean abs difference (grey "
                        "levels) is at most this")
    m.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicate images")
    m.add_argument("--val-fraction", type=float, default=None, help="default: PMC-15M's 13.6k/15.28M")
    m.add_argument("--test-fraction", type=float, default=None, help="default: PMC-15M's 725,739/15.28M")
    m.add_argument("--seed", type=int, default=0, help="seed of the article -> split hash")
    p.set_defaults(func=run)


def _options(args):
    # The builder (PIL, numpy, tqdm) is imported when the command runs, not when `bmclip --help` lists it.
    from bmclip.data.pmc.options import BuildOptions

    kw = dict(
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        jpeg_passthrough=not args.no_jpeg_passthrough,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        max_pixels=args.max_pixels,
        min_caption_chars=args.min_caption_chars,
        max_caption_chars=args.max_caption_chars,
        chunk_size=args.chunk_size,
        subcaptions=not args.no_subcaptions,
        use_gif=args.use_gif,
        shard_size=args.shard_size,
        near_dup_threshold=args.near_dup_threshold,
        near_dup_max_mad=args.near_dup_max_mad,
        dedup=not args.no_dedup,
        seed=args.seed,
    )
    if args.val_fraction is not None:
        kw["val_fraction"] = args.val_fraction
    if args.test_fraction is not None:
        kw["test_fraction"] = args.test_fraction
    return BuildOptions.from_kwargs(**kw)


def _summary(stats: dict) -> str:
    skips = stats["skips"]
    return json.dumps(
        {
            "pairs": stats["pairs"],
            "articles": stats["articles"],
            "figures": stats["figures"],
            "skips": skips,
        },
        indent=1,
    )


def run(args) -> int:
    """Run ``bmclip build-dataset`` (build, one slice's stage, or merge); returns the exit code."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("build-dataset: stopped; rerun the same command to resume (the finished stage chunks are kept; "
              "a merge starts over)", file=sys.stderr)
        raise


def _run(args) -> int:
    # The builder (PIL, numpy, tqdm) is imported when the command runs, not when `bmclip --help` lists it.
    from bmclip.data.pmc.build import build, merge_staging, stage
    from bmclip.data.pmc.stage import check_apart_from_inputs

    opts = _options(args)
    if args.num_slices < 1 or not 0 <= args.slice < args.num_slices:
        raise ConfigError(f"--num-slices must be >= 1 and --slice in [0, num-slices), got {args.num_slices} and "
                          f"{args.slice}")
    progress = not args.no_progress
    common = parse_storage_options(args.storage_option)
    in_so = {**common, **parse_storage_options(args.input_storage_option)}
    out_so = {**common, **parse_storage_options(args.output_storage_option)}
    inputs = list(args.inputs)
    merge_mode = args.merge
    if inputs and inputs[0] == "merge" and not Path("merge").exists():
        merge_mode, inputs = True, inputs[1:]
    if merge_mode:
        if not args.output:
            raise ConfigError("merge needs --output DIR")
        stats = merge_staging(inputs, args.output, opts, progress=progress, storage_options=out_so)
        print(_summary(stats))
        print(f"wrote {args.output}/manifest.json and stats.json/png", file=sys.stderr)
        return _report(stats, args.output)
    # Before any work: an output or staging dir among the inputs would be read back as packages by the next run.
    check_apart_from_inputs(inputs, {"output folder": args.output, "staging dir": args.staging})
    if args.num_slices > 1 or (args.staging and not args.output):
        if not args.staging:
            raise ConfigError("--num-slices > 1 needs --staging DIR (one per slice)")
        summary = stage(
            inputs,
            args.staging,
            opts,
            num_slices=args.num_slices,
            slice_index=args.slice,
            num_workers=args.workers,
            progress=progress,
            storage_options=in_so,
            staging_storage_options=out_so,
        )
        print(json.dumps(summary, indent=1))
        print(
            "staged; when every slice is done run: bmclip build-dataset merge STAGING... --output DIR",
            file=sys.stderr,
        )
        return 0
    if not args.output:
        raise ConfigError("--output DIR is required")
    stats = build(inputs, args.output, opts, staging=args.staging, keep_staging=args.keep_staging,
                  num_workers=args.workers, progress=progress, input_storage_options=in_so,
                  output_storage_options=out_so)
    print(_summary(stats))
    return _report(stats, args.output)


def _report(stats: dict, output: str) -> int:
    """Print the human summary and warnings on stderr; exit status 1 when no pair was written."""
    from bmclip.data.pmc.stats import summary_lines  # see run()

    lines, warnings = summary_lines(stats)
    for ln in lines:
        print(f"build-dataset: {ln}", file=sys.stderr)
    for w in warnings:
        print(f"build-dataset: warning: {w}", file=sys.stderr)
    if stats["pairs_total"] == 0:
        print(f"build-dataset: error: no pairs written to {output} (details in its stats.json)", file=sys.stderr)
        return 1
    return 0
