"""Native bmclip BiomedCLIP vs open_clip 3.3 (same random weights, fp32): encode_image / encode_text time.

Also shows the text tower's padding trim (drop columns that are padding in every row) against running
the full 256-token context. Methods run interleaved, best of --repeats, wall and process-CPU time.
Usage: python benchmarks/bench_model.py [--batch 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def real_caption_ids(n: int, shared: Path) -> torch.Tensor:
    """Real PMC captions tokenized (bundled vocabulary) to context 256: realistic padding."""
    import xml.etree.ElementTree as ET

    from bmclip.tokenizer import get_tokenizer

    caps = []
    for p in sorted(shared.rglob("*.*xml")):
        try:
            root = ET.parse(p).getroot()
        except ET.ParseError:
            continue
        caps += [" ".join("".join(e.itertext()).split()) for e in root.iter() if str(e.tag).endswith("caption")]
    caps = [c for c in caps if c]
    # An even spread over every caption in the samples (not the first article's), fixed for reruns.
    step = max(1, len(caps) // n)
    return get_tokenizer(context_length=256)(caps[::step][:n])


def timed(fn, sync):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "data" / "pmc_samples"))
    args = ap.parse_args()

    import test_open_clip_interop as T  # the offline open_clip builder used by the parity tests

    from bmclip.interop import _convert_in, config_from_open_clip
    from bmclip.model.clip import BiomedCLIP

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    oc = T._build_open_clip(T.RELEASED_CONFIG["model_cfg"])
    T._randomise_(oc, 0)
    sd = oc.state_dict()
    cfg = config_from_open_clip(sd, T.RELEASED_CONFIG)
    ours = BiomedCLIP(cfg)
    ours.load_state_dict(_convert_in(sd, cfg))
    oc, ours = oc.to(dev).eval(), ours.to(dev).eval()
    images = torch.randn(args.batch, 3, 224, 224, device=dev)
    ids = real_caption_ids(args.batch, Path(args.shared)).to(dev)
    lengths = (ids != 0).sum(1).tolist()

    def ours_text(trim):
        ours.text.trim_padding = trim
        return ours.encode_text(ids)

    methods = {
        "open_clip encode_image": lambda: oc.encode_image(images),
        "bmclip encode_image": lambda: ours.encode_image(images),
        "open_clip encode_text (256 ctx)": lambda: oc.encode_text(ids),
        "bmclip encode_text, no trim (256 ctx)": lambda: ours_text(False),
        "bmclip encode_text, trim (default)": lambda: ours_text(True),
    }
    best = {k: (float("inf"), float("inf")) for k in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for k, fn in methods.items():
                w, c = timed(fn, sync)
                best[k] = (min(best[k][0], w), min(best[k][1], c))
    res = {"device": str(dev), "batch": args.batch, "caption_tokens": lengths, "threads": torch.get_num_threads()}
    print(json.dumps(res))
    print("| method | best wall s | best CPU s | x open_clip (wall) |\n|---|---:|---:|---:|")
    for k, (w, c) in best.items():
        base = best["open_clip encode_image" if "image" in k else "open_clip encode_text (256 ctx)"][0]
        print(f"| {k} | {w:.3f} | {c:.3f} | {base / w:.2f} |")


if __name__ == "__main__":
    main()
