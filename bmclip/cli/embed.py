"""``bmclip embed``: embed images and captions with a model and print their similarity matrix.

With no arguments it is the smallest real end-to-end run: the seeded ``tiny`` model, the bundled
tokenizer, and the bundled sample figures and captions (real CC BY PMC figures, bmclip/assets/samples).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bmclip.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed images and captions and print their similarity matrix",
        description="Embed images and captions and print image x caption cosine similarities and "
        "softmax probabilities. Defaults: the seeded tiny model on the bundled sample figures.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The embed options (shared with ``bmclip demo``)."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="randomly initialised model preset (default: tiny)")
    src.add_argument("--open-clip", metavar="DIR", help="released-layout open_clip folder (e.g. BiomedCLIP)")
    src.add_argument("--checkpoint", metavar="PATH",
                     help="bmclip model file (bmclip convert), training checkpoint dir, training run dir (its "
                          "newest valid checkpoint) or open_clip folder")
    p.add_argument("--vocab", metavar="PATH", help="vocab.txt or tokenizer folder (default: bundled, or DIR's)")
    p.add_argument("--images", nargs="+", metavar="IMG", help="image files (default: bundled samples)")
    p.add_argument("--captions", nargs="+", metavar="TEXT", help="captions (default: bundled sample captions)")
    p.add_argument("--seed", type=int, default=0, help="seed for the randomly initialised preset")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto (default: cpu)")


def bundled_samples() -> tuple[list, list[str]]:
    """(image paths, captions) of the bundled sample figures."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "samples"
    with open(folder / "captions.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [folder / r["file"] for r in rows], [r["caption"] for r in rows]


def _model_and_tokenizer(args):
    # start-up cost: `bmclip --help` imports no torch
    import torch

    from bmclip.cli.eval import _device
    from bmclip.eval.models import model_tokenizer
    from bmclip.model import create_model
    from bmclip.resolve import resolve_model

    device = _device(args.device)
    source = args.open_clip or args.checkpoint
    if source:
        resolved = resolve_model(source)
        model, tok = resolved.model, model_tokenizer(resolved.model, resolved.source, args.vocab)
    else:
        try:
            torch.manual_seed(args.seed)
        except (ValueError, OverflowError, RuntimeError):
            raise ConfigError(f"--seed {args.seed}: out of range (0 .. 2**64 - 1)") from None
        model = create_model(args.preset)
        tok = model_tokenizer(model, None, args.vocab)
    return model.to(device).eval(), tok


def embed(args) -> dict:
    """Run the embedding; returns dict(images, captions, similarity (I, T) tensor, probs (I, T))."""
    # start-up cost: `bmclip --help` imports no torch
    import torch
    import torch.nn.functional as F

    from bmclip.eval.images import load_image  # PIL formats and DICOM; 16-bit greyscale scaled, not clipped
    from bmclip.model.transforms import preprocess_image

    model, tok = _model_and_tokenizer(args)
    default_images, default_caps = bundled_samples()
    images = list(args.images or default_images)
    captions = list(args.captions or default_caps)
    # nothing to embed (blank, or only control / zero-width characters the tokenizer drops): a meaningless row
    if blank := [j for j, c in enumerate(captions) if tok.count_tokens(c) == 0]:
        raise ConfigError(f"--captions: caption {blank[0]} is empty after tokenization (blank, or only control or "
                          "zero-width characters): give some text for every caption")
    size = model.config.vision.image_size
    pixels = torch.stack([preprocess_image(load_image(p), size) for p in images]).to(next(model.parameters()).device)
    ids = tok(captions).to(next(model.parameters()).device)
    with torch.no_grad():
        out = model(pixels, ids)
        sim = out["image_features"] @ out["text_features"].T
        logits = out["logit_scale"] * sim
        if out["logit_bias"] is not None:
            logits = logits + out["logit_bias"]
        probs = F.softmax(logits, dim=-1)
    return {"images": images, "captions": captions, "similarity": sim.cpu(), "probs": probs.cpu(), "model": model}


def row_labels(paths) -> list[str]:
    """A label per image path: the shortest path suffix (file name, then its folder, ...) that no other path in
    ``paths`` ends with, so ``a/fig1.png`` and ``b/fig1.png`` are told apart (the same path twice gets one label)."""
    parts = [Path(p).parts or (str(p),) for p in paths]
    k = [1] * len(parts)
    while True:
        labels = [str(Path(*ps[-n:])) for ps, n in zip(parts, k)]
        seen: dict[str, list[int]] = {}
        for i, label in enumerate(labels):
            seen.setdefault(label, []).append(i)
        grown = False
        for group in seen.values():
            if len({parts[i] for i in group}) > 1:  # the same path twice is one image: no need to tell it apart
                for i in group:
                    if k[i] < len(parts[i]):
                        k[i] += 1
                        grown = True
        if not grown:
            return labels


def print_matrix(res: dict) -> None:
    """Print the similarity and probability matrices with short row/column labels."""
    model = res["model"]
    cfg = model.config
    print(
        f"model: vision {cfg.vision.width}w x {cfg.vision.layers}L @ {cfg.vision.image_size}px, "
        f"text {cfg.text.width}w x {cfg.text.layers}L, embed {cfg.embed_dim}, {model.num_params() / 1e6:.2f}M params"
    )
    for j, c in enumerate(res["captions"]):
        print(f"  T{j}: {c[:100]}{'...' if len(c) > 100 else ''}")
    header = "".join(f"{f'T{j}':>9}" for j in range(len(res["captions"])))
    labels = row_labels(res["images"])
    width = max([26, *map(len, labels)])  # whole labels: a cut one could lose what tells two images apart
    for title, mat in (("cosine similarity", res["similarity"]), ("P(caption | image)", res["probs"])):
        print(f"{title}:")
        print(f"{'':{width + 2}}{header}")
        for label, row in zip(labels, mat.tolist()):
            print(f"  {label:{width}}" + "".join(f"{v:9.4f}" for v in row))


def run(args: argparse.Namespace) -> int:
    print_matrix(embed(args))
    return 0
