"""The PMC figure-caption dataset builder: stage (parallel, resumable, sliceable) then merge (dedup, split, shards).

Pipeline
--------
1. **Discover** packages under the inputs (:mod:`bmclip.data.pmc.sources`), sorted by package key
   (the path relative to the input, prefixed with the input's name). ``num_slices``/``slice_index``
   keep the packages whose ``sha256(key) % num_slices == slice_index``.
2. **Stage**: packages are cut into chunks of ``chunk_size`` (in key order). A process pool handles
   one chunk per task: read package -> parse JATS -> per figure: caption filters -> resolve graphic ->
   decode / filter / resize / encode (:mod:`~bmclip.data.pmc.media`). Each chunk's result is written to
   ``STAGING/chunks/chunk-NNNNNN.bin`` (temp file, fsync, rename): the file's existence is the
   completion journal, so a killed run rerun with the same command redoes only the missing chunks and
   never duplicates or loses a pair. Memory is bounded by ``workers x chunk`` (resized JPEGs only).
3. **Merge** one or many staging dirs (slices) as one stream in global package-key order (k-way
   merge), so the output does not depend on the number of workers or slices: duplicate articles (same
   PMCID/DOI in two packages) keep the first, exact and near-duplicate images keep the first
   (:mod:`~bmclip.data.pmc.dedup`), each article goes to one split by ``sha256(seed:PMCID)``, and
   samples go to ``{split}-{000000..}.tar`` webdataset shards of ``shard_size`` samples (each shard's
   samples in sorted key order) with DALI ``.idx`` files beside them, then ``stats.json`` (+ PNG plots),
   ``sizes.json`` (shard name -> samples, what open_clip_train reads) and ``manifest.json``.

Split fractions default to PMC-15M's (BiomedCLIP paper: 13.9M train / 13.6k val / 725,739 test of
15,282,336 pairs): ``val_fraction = 13_600 / 15_282_336 ≈ 0.00089``, ``test_fraction =
725_739 / 15_282_336 ≈ 0.0475``.

Shard samples are in sorted key order, each sample's members sorted by extension (fixed mtime 0 / uid 0 /
empty owner names, ``KEY`` without dots): ``KEY.jpg`` (JPEG, longest side <= max_side; RGB, or a
passed-through greyscale source), ``KEY.json`` (pmcid, pmid, doi, figure id and label, licence, original
and stored image size, href and media file, subcaptions), ``KEY.txt`` (caption, UTF-8).
DALI index format (``tools/wds2idx.py``, version ``v1.2``): first line ``v1.2 <num_samples>``, then one line
per sample of ``<ext> <data offset> <size> <member name>`` groups separated by spaces.

Slurm array example (4 machines/tasks, then one merge)::

    #SBATCH --array=0-3
    bmclip build-dataset /data/oa_package --staging /scratch/pmc_stage/$SLURM_ARRAY_TASK_ID \\
        --num-slices 4 --slice $SLURM_ARRAY_TASK_ID --workers $SLURM_CPUS_PER_TASK
    # after the array (sbatch --dependency=afterok:<array job id>):
    bmclip build-dataset merge /scratch/pmc_stage/{0,1,2,3} --output /data/pmc15m_shards

A failed array task is simply resubmitted with the same command: it resumes its own staging dir.
See ``docs/build_dataset.md``.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import re
import struct
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bmclip.errors import ConfigError, DataError

__all__ = ["BuildOptions", "build_dataset", "merge_staging", "stage", "licence_code"]

PMC15M_PAIRS = 15_282_336
DEFAULT_VAL_FRACTION = 13_600 / PMC15M_PAIRS
DEFAULT_TEST_FRACTION = 725_739 / PMC15M_PAIRS
SPLITS = ("train", "val", "test")
_CHUNK_MAGIC = b"BMCHUNK1"
_STAGING_VERSION = 3  # 2: JPEG pass-through, DCT-scale-exact resize box; 3: content-derived fallback article IDs


@dataclass
class BuildOptions:
    """All builder settings. Stage-time ones are recorded in the staging plan; merge-time ones are not."""

    # stage time (changing them requires a fresh staging dir)
    max_side: int = 512
    jpeg_quality: int = 90
    jpeg_passthrough: bool = True  # JPEGs that already fit max_side are stored as is (media.process_image)
    min_side: int = 64
    max_aspect: float = 10.0
    max_pixels: int = 89_478_485
    min_caption_chars: int = 10
    max_member_bytes: int = 256 << 20
    max_package_bytes: int = 16 << 30  # uncompressed; beyond it a package is refused (gzip bomb)
    chunk_size: int = 16
    subcaptions: bool = True
    use_gif: bool = False  # PMC's .gif files are ~100 px thumbnails of the real figure
    # merge time
    shard_size: int = 1000
    dedup: bool = True  # exact + near duplicate image removal
    near_dup_threshold: int = 3  # dHash Hamming radius of near-duplicate candidates
    near_dup_max_mad: float = 2.5  # and their 16x16 thumbnails' mean abs difference (grey levels)
    val_fraction: float = DEFAULT_VAL_FRACTION
    test_fraction: float = DEFAULT_TEST_FRACTION
    seed: int = 0

    STAGE_KEYS = (
        "max_side",
        "jpeg_quality",
        "jpeg_passthrough",
        "min_side",
        "max_aspect",
        "max_pixels",
        "min_caption_chars",
        "max_member_bytes",
        "max_package_bytes",
        "chunk_size",
        "subcaptions",
        "use_gif",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if self.max_side < 16:
            raise ConfigError(f"max_side must be >= 16, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.min_side < 1 or self.max_aspect < 1 or self.max_pixels < 1:
            raise ConfigError("min_side, max_aspect and max_pixels must be positive (max_aspect >= 1)")
        if self.chunk_size < 1 or self.shard_size < 1:
            raise ConfigError("chunk_size and shard_size must be >= 1")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val_fraction and test_fraction must be >= 0 with a sum < 1")
        if self.near_dup_threshold > 31:
            raise ConfigError("near_dup_threshold must be <= 31 (-1 disables near-duplicate removal)")

    def stage_dict(self) -> dict:
        """The stage-time options as a plain dict."""
        return {k: getattr(self, k) for k in self.STAGE_KEYS}

    @classmethod
    def from_kwargs(cls, **kw) -> BuildOptions:
        """Options from keyword arguments; an unknown name is a ConfigError."""
        names = {f.name for f in fields(cls)}
        bad = sorted(set(kw) - names)
        if bad:
            raise ConfigError(f"unknown build option(s): {', '.join(bad)} (known: {', '.join(sorted(names))})")
        o = cls(**kw)
        o.validate()
        return o


# --------------------------------------------------------------------------------------------------
# helpers


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(s: str, limit: int = 80) -> str:
    """A webdataset key part: only [A-Za-z0-9_-] (no dots), at most ``limit`` chars (hash-suffixed)."""
    k = _KEY_BAD.sub("_", s).strip("_") or "x"
    if len(k) > limit:
        k = k[: limit - 13] + "_" + hashlib.sha256(s.encode()).hexdigest()[:12]
    return k


def licence_code(lic: str | None) -> str:
    """Short licence class for statistics: 'CC BY', 'CC BY-NC-ND', 'CC0', 'public domain', 'other', 'unknown'."""
    if not lic:
        return "unknown"
    s = lic.lower()
    m = re.search(r"creativecommons\.org/licen[cs]es/([a-z-]+)", s)
    if m:
        return "CC " + m.group(1).upper()
    if "publicdomain/zero" in s or re.search(r"\bcc0\b", s):
        return "CC0"
    if "publicdomain/mark" in s or "public domain" in s or "free of all copyright" in s:
        return "public domain"
    m = re.match(r"^\s*cc[ -]?(by(?:[ -](?:nc|nd|sa))*)\b", s)
    if m:
        return "CC " + m.group(1).upper().replace(" ", "-")
    if "creative commons attribution" in s:
        parts = ["BY"]
        if "noncommercial" in s or "non-commercial" in s:
            parts.append("NC")
        if "noderivatives" in s or "no derivatives" in s or "noderivs" in s:
            parts.append("ND")
        if "sharealike" in s or "share alike" in s:
            parts.append("SA")
        return "CC " + "-".join(parts)
    return "other"


def split_of(article_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of an article from sha256(f'{seed}:{article_id}') mapped to [0, 1): test, then val, then train."""
    h = hashlib.sha256(f"{seed}:{article_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _token_counter():
    """(label, fn(str) -> int) for the caption-length histogram: bmclip's tokenizer when available."""
    try:
        from bmclip.tokenizer import get_tokenizer

        tok = get_tokenizer()
        count_pieces = tok.count_tokens
        count_pieces("probe")
    except Exception as e:  # ImportError or missing vocabulary: fall back for the histogram only
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        return f"whitespace words (fallback: bmclip.tokenizer unavailable: {reason})", lambda s: len(s.split())

    def count(s: str) -> int:
        # Untruncated WordPiece count + [CLS] and [SEP], i.e. what the text tower sees before truncation.
        return count_pieces(s) + 2

    return "bmclip.tokenizer.get_tokenizer() WordPiece tokens incl. [CLS]/[SEP], untruncated", count


# --------------------------------------------------------------------------------------------------
# stage: per-package processing (runs in worker processes)


def _article_id(art, xml_sha: str, index: int, n_articles: int) -> str:
    """The article's identity for splitting and article-level dedup: PMCID, else DOI, else PMID, else a hash of
    its XML file (``xml:<16 hex>``, ``#i`` for the i-th article of an articleset). Never the package's path, so
    the same article given as a folder, a tarball or in PMC Cloud layout gets one ID (one split, one copy)."""
    if art.pmcid:
        return art.pmcid
    if art.doi:
        return "doi:" + art.doi.lower()
    if art.pmid:
        return "pmid:" + art.pmid
    return f"xml:{xml_sha}" if n_articles == 1 else f"xml:{xml_sha}#{index}"


def process_package(pkg, opts: BuildOptions, count_tokens) -> dict:
    """Process one package into a staging record: {'key', 'skips', 'articles', 'samples'}.

    Every figure ends as one sample or one counted reason in ``skips['figure']``; package-level and
    article-level problems go to ``skips['package']`` / ``skips['article']``. Samples carry the JPEG
    bytes under ``'_jpeg'``.
    """
    from bmclip.data.pmc.jats import NotJatsError, parse_jats
    from bmclip.data.pmc.media import ImageSkip, process_image, resolve_graphics
    from bmclip.data.pmc.sources import PackageError, read_package
    from bmclip.data.pmc.subcaptions import split_subcaptions

    fig_skips: Counter = Counter()
    pkg_skips: Counter = Counter()
    art_skips: Counter = Counter()
    rec = {"key": pkg.key, "articles": [], "samples": []}
    try:
        content = read_package(pkg, opts.max_member_bytes, opts.max_package_bytes)
    except PackageError as e:
        pkg_skips[e.reason] += 1
        rec["skips"] = {"package": dict(pkg_skips), "article": {}, "figure": {}}
        rec["errors"] = [str(e)]
        return rec
    pkg_skips.update(content.skips)
    errors: list[str] = []
    articles = []  # (article, sha of its XML file, index in that file, articles in that file)
    for name, data in content.xml:
        try:
            parsed = parse_jats(data)
        except NotJatsError:
            pkg_skips["non_jats_xml"] += 1
            continue
        except (DataError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            pkg_skips["xml_error"] += 1
            errors.append(f"{pkg.key}/{name}: {str(e).replace('<bytes>: ', '')}")
            continue
        parsed = parsed if isinstance(parsed, list) else [parsed]
        xml_sha = hashlib.sha256(data).hexdigest()[:16]
        articles.extend((art, xml_sha, i, len(parsed)) for i, art in enumerate(parsed))
    if not content.xml:
        pkg_skips["no_xml"] += 1
    media_names = {n.lower(): n for n in content.media}
    meta = content.meta or {}
    for art, xml_sha, ai, n_in_file in articles:
        aid = _article_id(art, xml_sha, ai, n_in_file)
        licence = art.license or meta.get("license_code") or meta.get("license")
        arec = {"id": aid, "figures": len(art.figures)}
        rec["articles"].append(arec)
        if meta.get("is_retracted") is True:
            art_skips["retracted"] += 1
            fig_skips["retracted"] += len(art.figures)
            arec["retracted"] = True
            continue
        used_keys: set[str] = set()
        for fi, fig in enumerate(art.figures):
            if not fig.graphics:
                fig_skips["no_graphic"] += 1
                continue
            caption = fig.caption
            if not caption:
                fig_skips["no_caption"] += 1
                continue
            if len(caption) < opts.min_caption_chars:
                fig_skips["short_caption"] += 1
                continue
            files = resolve_graphics(fig.graphics, media_names)
            if not files:
                fig_skips["missing_image"] += 1
                continue
            if not opts.use_gif:
                files = [f for f in files if not f.lower().endswith(".gif")]
                if not files:
                    fig_skips["thumbnail_only"] += 1
                    continue
            img = first_skip = None
            for chosen in files:
                try:
                    img = process_image(
                        content.media[chosen],
                        max_side=opts.max_side,
                        quality=opts.jpeg_quality,
                        max_pixels=opts.max_pixels,
                        min_side=opts.min_side,
                        max_aspect=opts.max_aspect,
                        passthrough=opts.jpeg_passthrough,
                    )
                    break
                except ImageSkip as e:
                    first_skip = first_skip or e.reason
                    if e.reason not in ("undecodable_image", "empty_image"):
                        break  # size/aspect/bomb describe the figure: another format of it will not help
            if img is None:
                fig_skips[first_skip] += 1
                continue
            fig_part = sanitize_key(fig.id or f"fig{fi + 1}", 40)
            key = f"{sanitize_key(aid.removeprefix('doi:'), 60)}_{fig_part}"
            if key in used_keys:
                key = f"{key}_{fi + 1}"
            used_keys.add(key)
            meta_out = {
                "key": key,
                "article_id": aid,
                "pmcid": art.pmcid,
                "pmid": art.pmid,
                "doi": art.doi,
                "figure_id": fig.id,
                "label": fig.label,
                "license": licence,
                "href": fig.graphics[0] if len(fig.graphics) == 1 else fig.graphics,
                "file": chosen,
                "original_size": list(img.orig_size),
                "size": list(img.size),
            }
            if opts.subcaptions:
                sub = split_subcaptions(caption)
                if sub is not None:
                    meta_out["subcaptions"] = sub
            rec["samples"].append(
                {
                    "meta": meta_out,
                    "caption": caption,
                    "sha": img.sha,
                    "dhash": img.dhash,
                    "thumb": base64.b64encode(img.thumb).decode("ascii"),
                    "tokens": count_tokens(caption),
                    "_jpeg": img.jpeg,
                }
            )
    rec["skips"] = {"package": dict(pkg_skips), "article": dict(art_skips), "figure": dict(fig_skips)}
    if errors:
        rec["errors"] = errors
    return rec


def _process_package_guarded(pkg, opts: BuildOptions, count_tokens) -> dict:
    """process_package, with any unexpected exception turned into a counted package skip.

    One pathological package must not stop a multi-day build: it is recorded as ``internal_error``
    with its message in ``first_errors`` (and so can be reported and fixed), and the run goes on.
    """
    try:
        return process_package(pkg, opts, count_tokens)
    except Exception as e:
        return {
            "key": pkg.key,
            "articles": [],
            "samples": [],
            "skips": {"package": {"internal_error": 1}, "article": {}, "figure": {}},
            "errors": [f"{pkg.key}: internal error {type(e).__name__}: {e}"],
        }


def _encode_chunk(index: int, records: list[dict]) -> bytes:
    blobs: list[bytes] = []
    off = 0
    for r in records:
        for s in r["samples"]:
            jpg = s.pop("_jpeg")
            s["offset"], s["length"] = off, len(jpg)
            off += len(jpg)
            blobs.append(jpg)
    header = json.dumps({"version": _STAGING_VERSION, "chunk": index, "packages": records}, sort_keys=True)
    hb = header.encode("utf-8")
    return b"".join([_CHUNK_MAGIC, struct.pack("<QQ", len(hb), off), hb, *blobs])


def _read_chunk(path: Path) -> tuple[list[dict], bytes]:
    data = path.read_bytes()
    if len(data) < 24 or data[:8] != _CHUNK_MAGIC:
        raise DataError(f"{path}: not a bmclip staging chunk")
    hlen, blen = struct.unpack("<QQ", data[8:24])
    if len(data) != 24 + hlen + blen:
        raise DataError(f"{path}: staging chunk has {len(data)} bytes, expected {24 + hlen + blen} (corrupt)")
    try:
        header = json.loads(data[24 : 24 + hlen])
        return header["packages"], data[24 + hlen :]
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: corrupt staging chunk header ({e}); delete it and rerun the stage") from e


_WORKER_TOKENS = None


def _chunk_task(args) -> tuple[int, int, dict]:
    """Process one chunk of packages and write its staging file (runs in a worker process)."""
    return _chunk_task_impl(args)


def _chunk_task_impl(args) -> tuple[int, int, dict]:
    index, packages, chunk_dir, opts_dict = args
    global _WORKER_TOKENS
    if _WORKER_TOKENS is None:
        _WORKER_TOKENS = _token_counter()
    opts = BuildOptions(**opts_dict)
    records = [_process_package_guarded(p, opts, _WORKER_TOKENS[1]) for p in packages]
    for r in records:
        r["tokenizer"] = _WORKER_TOKENS[0]
    n = sum(len(r["samples"]) for r in records)
    _fsync_write(Path(chunk_dir) / f"chunk-{index:06d}.bin", _encode_chunk(index, records))
    errors = [e for r in records for e in r.get("errors", ())]
    return index, n, {"packages": len(packages), "errors": errors[:5]}


def _run_pool(tasks: list, workers: int, account) -> None:
    """Run chunk tasks on a process pool, at most 4 per worker in flight (bounded memory).

    ProcessPoolExecutor rather than multiprocessing.Pool: a worker killed by the OOM killer surfaces
    as BrokenProcessPool (reported as a DataError telling the user to rerun and resume) instead of an
    eternal hang.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pending = iter(tasks)
    in_flight: set = set()
    with ProcessPoolExecutor(workers) as ex:
        try:
            while True:
                while len(in_flight) < 4 * workers:
                    t = next(pending, None)
                    if t is None:
                        break
                    in_flight.add(ex.submit(_chunk_task, t))
                if not in_flight:
                    break
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for f in done:
                    account(f.result())
        except BrokenProcessPool as e:
            raise DataError(
                "a build worker process died (out of memory or killed); finished chunks are kept: "
                "rerun the same command to resume"
            ) from e


def _plan_digest(keys: list[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(k.encode("utf-8") + b"\n")
    return h.hexdigest()


def stage(
    inputs: list[str | os.PathLike],
    staging: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    num_slices: int = 1,
    slice_index: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Process the inputs' packages (one slice of them) into resumable staging chunks; returns a summary dict."""
    from bmclip.data.pmc.sources import discover_packages, slice_of

    opts = options or BuildOptions()
    opts.validate()
    if num_slices < 1 or not 0 <= slice_index < num_slices:
        raise ConfigError(f"slice must be in [0, {num_slices}), got {slice_index}")
    if not inputs:
        raise ConfigError("no inputs given")
    passed_over: list[tuple[str, str]] = []
    packages, _ = discover_packages(list(inputs), passed_over)
    if num_slices > 1:
        packages = [p for p in packages if slice_of(p.key, num_slices) == slice_index]
        passed_over = [(r, k) for r, k in passed_over if slice_of(k, num_slices) == slice_index]
    disc_skips = Counter(r for r, _k in passed_over)
    staging = Path(staging)
    chunk_dir = staging / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    plan = {
        "version": _STAGING_VERSION,
        "options": opts.stage_dict(),
        "num_slices": num_slices,
        "slice": slice_index,
        "num_packages": len(packages),
        "packages_sha256": _plan_digest([p.key for p in packages]),
        "discovery_skips": dict(sorted(disc_skips.items())),
    }
    plan_path = staging / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ConfigError(
                f"staging dir {staging} was made by a different run (differs in: {', '.join(diff)}); "
                "rerun with the same inputs/options, or use an empty staging dir"
            )
    else:
        _fsync_write(plan_path, json.dumps(plan, indent=1, sort_keys=True).encode())
    for f in chunk_dir.iterdir():
        if ".tmp-" in f.name:
            f.unlink()  # a killed run's half-written chunk
    cs = opts.chunk_size
    chunks = [packages[i : i + cs] for i in range(0, len(packages), cs)]
    pending = [i for i in range(len(chunks)) if not (chunk_dir / f"chunk-{i:06d}.bin").exists()]
    done_before = len(chunks) - len(pending)
    tasks = [(i, chunks[i], str(chunk_dir), asdict(opts)) for i in pending]
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    workers = max(0, min(workers, len(tasks)))
    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(chunks[i]) for i in pending),
        unit="pkg",
        desc=f"stage {staging.name}",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    samples = 0
    errors: list[str] = []

    def account(result) -> None:
        nonlocal samples
        _i, n, info = result
        samples += n
        errors.extend(info["errors"])
        bar.update(info["packages"])
        bar.set_postfix(pairs=samples, refresh=False)

    try:
        if workers <= 1:
            for t in tasks:
                account(_chunk_task(t))
        else:
            _run_pool(tasks, workers, account)
    finally:
        bar.close()
    summary = {
        "staging": str(staging),
        "packages": len(packages),
        "chunks": len(chunks),
        "chunks_resumed": done_before,
        "samples_staged_now": samples,
        "first_errors": errors[:20],
    }
    _fsync_write(staging / "complete.json", json.dumps({"chunks": len(chunks), **plan}, sort_keys=True).encode())
    return summary


# --------------------------------------------------------------------------------------------------
# merge


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file (mode 644, mtime/uid/gid 0, no owner names).

    Built directly (byte-identical to ``TarInfo.tobuf(USTAR_FORMAT)``, tested) because tarfile's generic
    header code was a third of the merge's per-sample CPU time; names over 100 bytes (prefix/name split)
    and sizes over 8 GiB go through tarfile.
    """
    nb = name.encode("utf-8")
    if len(nb) > 100 or size >= 8**11:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        ti.type = tarfile.REGTYPE
        return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8")
    h = bytearray(_USTAR_TEMPLATE)
    h[: len(nb)] = nb
    h[124:136] = b"%011o\0" % size
    h[148:156] = b"%06o\0 " % sum(h)  # checksum over the header with its own field as 8 spaces
    return bytes(h)


def _make_ustar_template() -> bytes:
    h = bytearray(512)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # checksum placeholder
    h[156:157] = tarfile.REGTYPE
    h[257:265] = tarfile.POSIX_MAGIC  # b"ustar\x0000"
    # devmajor/devminor stay NUL for regular files, as tarfile writes them
    return bytes(h)


_USTAR_TEMPLATE = _make_ustar_template()


class _ShardWriter:
    """Writes {split}-NNNNNN.tar (+ .idx) deterministically, shard_size samples per shard.

    A shard's samples are the next ``shard_size`` of the merge stream, stored in sorted key order: they
    are spooled to a temp file as they arrive (memory holds only their keys and offsets) and copied into
    the tar sorted when the shard is full or the merge ends.
    """

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.index = 0
        self.spool = None
        self.shards: list[dict] = []

    def _open(self):
        self.name = f"{self.split}-{self.index:06d}.tar"
        self.spool_path = self.out / f".{self.name}.spool.tmp-{os.getpid()}"
        self.spool = open(self.spool_path, "w+b")
        self.spool_pos = 0
        self.entries: list[tuple[str, int, int, int, int]] = []  # key, spool offset, member sizes

    def add(self, key: str, jpg: bytes, js: bytes, txt: bytes) -> None:
        if self.spool is None:
            self._open()
        self.spool.write(jpg)
        self.spool.write(js)
        self.spool.write(txt)
        self.entries.append((key, self.spool_pos, len(jpg), len(js), len(txt)))
        self.spool_pos += len(jpg) + len(js) + len(txt)
        if len(self.entries) == self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        if self.spool is None:
            return
        tmp = self.out / f".{self.name}.tmp-{os.getpid()}"
        sha = hashlib.sha256()
        pos = 0
        idx_lines: list[str] = []
        with open(tmp, "wb") as f:

            def write(b: bytes) -> None:
                nonlocal pos
                f.write(b)
                sha.update(b)
                pos += len(b)

            self.spool.flush()
            for key, off, *sizes in sorted(self.entries):
                self.spool.seek(off)
                parts = []
                for ext, size in zip(("jpg", "json", "txt"), sizes):
                    data = self.spool.read(size)
                    write(_ustar_header(f"{key}.{ext}", size))
                    parts.append(f"{ext} {pos} {size} {key}.{ext}")
                    write(data)
                    if size % 512:
                        write(b"\0" * (512 - size % 512))
                idx_lines.append(" ".join(parts))
            write(b"\0" * 1024)  # end-of-archive marker
            f.flush()
            os.fsync(f.fileno())
        self.spool.close()
        self.spool_path.unlink()
        self.spool = None
        os.replace(tmp, self.out / self.name)
        idx_name = self.name[: -len(".tar")] + ".idx"
        count = len(self.entries)
        _fsync_write(self.out / idx_name, (f"v1.2 {count}\n" + "\n".join(idx_lines) + "\n").encode())
        self.shards.append(
            {
                "name": self.name,
                "index": idx_name,
                "split": self.split,
                "num_samples": count,
                "bytes": pos,
                "sha256": sha.hexdigest(),
            }
        )
        self.entries = []
        self.index += 1


def _staging_stream(staging: Path) -> Iterator[tuple[dict, bytes]]:
    complete = staging / "complete.json"
    if not complete.is_file():
        raise DataError(f"staging dir {staging} is not complete (no complete.json): rerun its stage command")
    n = json.loads(complete.read_text())["chunks"]
    for i in range(n):
        p = staging / "chunks" / f"chunk-{i:06d}.bin"
        if not p.is_file():
            raise DataError(f"staging dir {staging} lacks {p.name}: rerun its stage command")
        records, blob = _read_chunk(p)
        for r in records:
            yield r, blob


class _Hist:
    def __init__(self, width: int, nbins: int):
        self.width, self.counts = width, [0] * (nbins + 1)

    def add(self, v: int) -> None:
        self.counts[min(v // self.width, len(self.counts) - 1)] += 1

    def as_dict(self) -> dict:
        edges = [i * self.width for i in range(len(self.counts))]
        return {"bin_width": self.width, "bin_starts": edges, "counts": self.counts, "last_bin_is_overflow": True}


def merge_staging(
    stagings: list[str | os.PathLike],
    output: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Merge complete staging dirs into deduplicated, split webdataset shards + manifest + stats; returns stats."""
    opts = options or BuildOptions()
    opts.validate()
    if not stagings:
        raise ConfigError("merge needs at least one staging dir")
    stagings = [Path(s) for s in stagings]
    plans = []
    for s in stagings:
        if not (s / "plan.json").is_file():
            raise DataError(f"{s} is not a staging dir (no plan.json)")
        plans.append(json.loads((s / "plan.json").read_text()))
    if len({json.dumps(p["options"], sort_keys=True) for p in plans}) > 1:
        raise ConfigError("staging dirs were made with different stage options; they cannot be merged")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if ".tmp-" in f.name:
            f.unlink()
    for name in ("sizes.json", "manifest.json"):
        # An earlier build's sample counts would describe shards this merge is about to replace: until it
        # finishes, the folder has none (a killed merge leaves no counts that disagree with its shards).
        (out / name).unlink(missing_ok=True)
    from bmclip.data.pmc.dedup import Deduplicator

    dedup = Deduplicator(opts.near_dup_threshold, opts.near_dup_max_mad) if opts.dedup else None
    writers = {s: _ShardWriter(out, s, opts.shard_size) for s in SPLITS}
    fig_skips: Counter = Counter()
    pkg_skips: Counter = Counter()
    art_skips: Counter = Counter()
    for p in plans:
        pkg_skips.update(p.get("discovery_skips", {}))
    seen_articles: set[str] = set()
    pairs: Counter = Counter()
    articles_per_split: Counter = Counter()
    licences: Counter = Counter()
    tok_hist, side_hist = _Hist(8, 128), _Hist(128, 64)
    n_packages = n_articles = n_figures = over_context = 0
    tok_label = None
    errors: list[str] = []
    streams = [_staging_stream(s) for s in stagings]
    merged = heapq.merge(*streams, key=lambda rb: rb[0]["key"])
    from tqdm import tqdm

    bar = tqdm(unit="pkg", desc="merge", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for rec, blob in merged:
            bar.update(1)
            n_packages += 1
            sk = rec["skips"]
            pkg_skips.update(sk["package"])
            art_skips.update(sk["article"])
            fig_skips.update(sk["figure"])
            errors.extend(rec.get("errors", ()))
            dup_articles = set()
            for a in rec["articles"]:
                n_articles += 1
                n_figures += a["figures"]
                if a["id"] in seen_articles:
                    dup_articles.add(a["id"])
                    art_skips["duplicate_article"] += 1
                    continue
                seen_articles.add(a["id"])
            split_seen = set()
            for s in rec["samples"]:
                m = s["meta"]
                if m["article_id"] in dup_articles:
                    fig_skips["duplicate_article"] += 1
                    continue
                reason = None
                if dedup is not None:
                    reason = dedup.check_and_add(s["sha"], s["dhash"], base64.b64decode(s["thumb"]))
                if reason:
                    fig_skips[reason] += 1
                    continue
                split = split_of(m["article_id"], opts.seed, opts.val_fraction, opts.test_fraction)
                jpg = blob[s["offset"] : s["offset"] + s["length"]]
                js = json.dumps(m, sort_keys=True, ensure_ascii=False).encode("utf-8")
                writers[split].add(m["key"], jpg, js, s["caption"].encode("utf-8"))
                pairs[split] += 1
                if (m["article_id"], split) not in split_seen:
                    split_seen.add((m["article_id"], split))
                    articles_per_split[split] += 1
                licences[licence_code(m["license"])] += 1
                tok_hist.add(int(s["tokens"]))
                over_context += int(s["tokens"]) > 256
                side_hist.add(max(m["original_size"]))
            if tok_label is None and rec["samples"]:
                tok_label = rec.get("tokenizer")
        for w in writers.values():
            w.close_shard()
    finally:
        bar.close()
    shards = [sh for s in SPLITS for sh in writers[s].shards]
    keep = {sh["name"] for sh in shards} | {sh["index"] for sh in shards}
    stale = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)$")
    for f in out.iterdir():
        if stale.match(f.name) and f.name not in keep:
            f.unlink()  # left by an earlier, larger build into the same dir
    stats = {
        "format": "bmclip-pmc-wds-1",
        "packages": n_packages,
        "articles": n_articles,
        "figures": n_figures,
        "pairs": {s: pairs[s] for s in SPLITS},
        "pairs_total": sum(pairs.values()),
        "articles_per_split": {s: articles_per_split[s] for s in SPLITS},
        "skips": {
            "figure": dict(sorted(fig_skips.items())),
            "article": dict(sorted(art_skips.items())),
            "package": dict(sorted(pkg_skips.items())),
        },
        "licenses": dict(sorted(licences.items(), key=lambda kv: (-kv[1], kv[0]))),
        "caption_tokens": {
            "tokenizer": tok_label or "(no captions)",
            "over_256": over_context,  # captions a context-256 text tower truncates
            **tok_hist.as_dict(),
        },
        "image_long_side_original": side_hist.as_dict(),
        "options": asdict(opts),
        "first_errors": errors[:50],
    }
    manifest = {
        "format": "bmclip-pmc-wds-1",
        "shards": shards,
        "splits": {
            s: {"num_shards": len(writers[s].shards), "num_samples": pairs[s], "pattern": _pattern(writers[s])}
            for s in SPLITS
        },
        "sample_members": ["jpg", "json", "txt"],
        "options": asdict(opts),
        "stagings": [str(s) for s in stagings],
    }
    _fsync_write(out / "stats.json", json.dumps(stats, indent=1, ensure_ascii=False).encode("utf-8"))
    _write_plots(out, stats)
    # open_clip_train (get_dataset_size) reads the sample count of each shard from
    # sizes.json beside the shards: shard file name -> samples.
    sizes = {sh["name"]: sh["num_samples"] for sh in sorted(shards, key=lambda sh: sh["name"])}
    _fsync_write(out / "sizes.json", json.dumps(sizes, indent=1).encode("utf-8"))
    _fsync_write(out / "manifest.json", json.dumps(manifest, indent=1).encode("utf-8"))
    return stats


def summary_lines(stats: dict, top: int = 5) -> tuple[list[str], list[str]]:
    """(summary lines, warning lines) for people: pairs per split, the most frequent skip reasons, and a
    warning for every split that came out empty although its fraction is > 0 (or for no pairs at all)."""
    pairs = stats["pairs"]
    lines = [
        f"pairs: {stats['pairs_total']} ("
        + ", ".join(f"{s} {pairs[s]}" for s in SPLITS)
        + f") from {stats['articles']} articles, {stats['figures']} figures, {stats['packages']} packages"
    ]
    reasons = [(f"{level}:{r}", n) for level in ("figure", "article", "package")
               for r, n in stats["skips"][level].items() if n]
    reasons.sort(key=lambda kv: (-kv[1], kv[0]))
    if reasons:
        lines.append("top skip reasons: " + ", ".join(f"{r} {n}" for r, n in reasons[:top])
                     + (f" (+{len(reasons) - top} more in stats.json)" if len(reasons) > top else ""))
    else:
        lines.append("nothing skipped")
    warnings = []
    if stats["pairs_total"] == 0:
        warnings.append("no figure-caption pairs were written"
                        + ("; see the skip reasons above" if reasons else "; were any packages found?"))
    else:
        opts = stats.get("options", {})
        for split in ("val", "test"):
            frac = float(opts.get(f"{split}_fraction", 0) or 0)
            if pairs[split] == 0 and frac > 0:
                warnings.append(f"the {split} split is empty ({split}_fraction {frac:g} of "
                                f"{stats['articles']} articles drew none); use more articles or a larger fraction")
    return lines, warnings


def _pattern(w: _ShardWriter) -> str | None:
    n = len(w.shards)
    if n == 0:
        return None
    return f"{w.split}-{{000000..{n - 1:06d}}}.tar"


def _write_plots(out: Path, stats: dict) -> None:
    # Figure + Agg canvas directly: no pyplot (global state, slow import), safe in any process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ct = stats["caption_tokens"]
    ax = axes[0, 0]
    ax.bar(ct["bin_starts"], ct["counts"], width=ct["bin_width"], align="edge")
    ax.set_title("caption length")
    ax.set_xlabel(f"tokens ({ct['tokenizer'][:60]}); last bin = overflow")
    ax.set_ylabel("pairs")
    im = stats["image_long_side_original"]
    ax = axes[0, 1]
    ax.bar(im["bin_starts"], im["counts"], width=im["bin_width"], align="edge")
    ax.set_title("original image size")
    ax.set_xlabel("longest side (px); last bin = overflow")
    ax = axes[1, 0]
    sk = {**{f"fig:{k}": v for k, v in stats["skips"]["figure"].items()}}
    sk.update({f"art:{k}": v for k, v in stats["skips"]["article"].items()})
    sk.update({f"pkg:{k}": v for k, v in stats["skips"]["package"].items()})
    labels = list(stats["pairs"]) + list(sk)
    vals = list(stats["pairs"].values()) + list(sk.values())
    ax.barh(labels, vals, color=["tab:green"] * len(stats["pairs"]) + ["tab:red"] * len(sk))
    ax.set_title("pairs per split (green) and skips per reason (red)")
    ax = axes[1, 1]
    lic = stats["licenses"]
    ax.barh(list(lic) or ["(none)"], list(lic.values()) or [0])
    ax.set_title("licence mix (pairs)")
    fig.tight_layout()
    tmp = out / f".stats.png.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=80, metadata={"Software": None})
    os.replace(tmp, out / "stats.png")


# --------------------------------------------------------------------------------------------------
# one-call API


def build_dataset(inputs: list[str | os.PathLike], output: str | os.PathLike, **options) -> dict:
    """Build webdataset shards from PMC inputs into ``output`` (stage + merge); returns the stats dict.

    Options: any :class:`BuildOptions` field (``max_side=512, shard_size=1000, min_caption_chars=10,
    min_side=64, max_aspect=10.0, near_dup_threshold=3, val_fraction, test_fraction, seed=0, ...``) plus
    ``num_workers`` (default: all cores; 0/1 = in process), ``staging`` (default ``output/_staging``),
    ``keep_staging`` (default False) and ``progress`` (default True). Rerunning the same call after a
    crash resumes from the staging dir.
    """
    num_workers = options.pop("num_workers", None)
    staging = options.pop("staging", None)
    keep_staging = options.pop("keep_staging", False)
    progress = options.pop("progress", True)
    opts = BuildOptions.from_kwargs(**options)
    out = Path(output)
    staging = Path(staging) if staging is not None else out / "_staging"
    stage(inputs, staging, opts, num_workers=num_workers, progress=progress)
    stats = merge_staging([staging], out, opts, progress=progress)
    if not keep_staging:
        import shutil

        shutil.rmtree(staging)
    return stats
