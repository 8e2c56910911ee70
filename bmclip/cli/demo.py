"""``bmclip demo [--out DIR] [--size small|ci]``: generate a corpus, build shards, train, evaluate, report."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo: synthetic PMC corpus -> shards -> train tiny model -> retrieval + zero-shot",
        description=(
            "Generate a small corpus of PMC-style article packages (JATS XML + rendered figures), build "
            "webdataset shards, train the tiny model on CPU, then evaluate retrieval on held-out articles "
            "and zero-shot figure-type classification. Writes OUT/report.json and PNG curves. No network; "
            "about 5 minutes on 2 CPU cores for the default size."
        ),
    )
    p.add_argument("--out", default="bmclip-demo", help="output folder (default: ./bmclip-demo)")
    p.add_argument("--size", default="small", choices=["small", "ci"], help="corpus/training size (ci: faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="only print the final summary")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: ``bmclip --help`` must not pay for torch and the trainer.
    from bmclip.demo import format_summary, run_demo

    report = run_demo(args.out, size=args.size, seed=args.seed, quiet=args.quiet, progress=not args.quiet)
    if args.quiet:
        print(format_summary(report))
    return 0
