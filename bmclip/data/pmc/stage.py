"""Staging: article packages -> figure-caption samples, written as resumable chunk files.

The packages (found by :mod:`bmclip.data.pmc.sources`, sorted by key) are cut into chunks of
``chunk_size`` in key order. A process pool handles one chunk per task: read package -> parse JATS -> per
figure: caption filters -> resolve graphic -> decode / filter / resize / encode
(:mod:`~bmclip.data.pmc.media`). Each chunk's result is written atomically to
``STAGING/chunks/chunk-NNNNNN.bin`` (a local file or a remote object, :mod:`~bmclip.data.pmc.staging`): its
existence is the completion journal, so a killed run rerun with the same command redoes only the missing
chunks and never duplicates or loses a pair. Memory is
bounded by ``workers x chunk`` (resized JPEGs only). ``plan.json`` records the inputs' package keys and the
stage-time options (a rerun with different ones is refused); ``complete.json`` marks a finished stage.

Chunk file: ``BMCHUNK1``, two little-endian u64 (header length, blob length), a UTF-8 JSON header
``{"version", "chunk", "packages": [record, ...]}``, then the samples' JPEG bytes back to back (each
sample's ``offset``/``length`` point into that blob).

Everything here is pure Python (no torch, no compiled extension needed): it runs in the worker processes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path

from bmclip.data.pmc import jats
from bmclip.data.pmc.media import ImageSkip, ProcessedImage, process_image, resolve_graphics
from bmclip.data.pmc.options import BuildOptions
from bmclip.data.pmc.sources import InputReadError, Package, PackageError, discover_packages, read_package, slice_of
from bmclip.data.pmc.staging import StagingDir, remove_partial_files
from bmclip.data.pmc.stats import printable
from bmclip.data.pmc.subcaptions import split_subcaptions
from bmclip.errors import ConfigError, DataError, is_int
from bmclip.io.fs import is_remote, local_path
from bmclip.progress import Progress
from bmclip.tokenizer import get_tokenizer

__all__ = ["article_identifiers", "check_apart_from_inputs", "normalize_doi", "process_package",
           "remove_partial_files", "sanitize_key", "stage", "staging_stream"]

_CHUNK_MAGIC = b"BMCHUNK1"
# 2: JPEG pass-through, DCT-scale-exact resize box; 3: content-derived fallback article IDs; 4: dHash of exact
# area means, no formula/caption/table graphic as a figure's image, <mfenced> brackets in captions, every article's
# identifiers ("ids") and the retracted ones (complete.json "retracted", chunks/retracted-NNNNNN.json)
_STAGING_VERSION = 4


def chunk_name(index: int) -> str:
    """The name of staging chunk ``index`` inside its staging dir."""
    return f"chunks/chunk-{index:06d}.bin"


def retracted_name(index: int) -> str:
    """The name of the list of retracted articles' identifiers of staging chunk ``index`` (only when it has any)."""
    return f"chunks/retracted-{index:06d}.json"


def chunk_path(staging: Path, index: int) -> Path:
    """The file of staging chunk ``index`` of a local staging dir."""
    return staging / chunk_name(index)


_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(s: str, limit: int = 80) -> str:
    """A webdataset key part: only [A-Za-z0-9_-] (no dots), at most ``limit`` chars (hash-suffixed)."""
    k = _KEY_BAD.sub("_", s).strip("_") or "x"
    if len(k) > limit:
        k = k[: limit - 13] + "_" + hashlib.sha256(s.encode()).hexdigest()[:12]
    return k


def article_key_part(article_id: str) -> str:
    """The article's part of its samples' keys (``PMC1234567``, a sanitized DOI, ...)."""
    return sanitize_key(article_id.removeprefix("doi:"), 60)


def _key_bytes(key: str) -> bytes:
    """A package key as bytes, for hashing: its file name's own bytes (surrogateescape), UTF-8 for a valid one."""
    return key.encode("utf-8", "surrogateescape")


def _slice_of(key: str, num_slices: int) -> int:
    """``sources.slice_of`` of a package key whose file names may hold undecodable bytes (the escaped form of
    such a key is hashed; a valid key gets the same slice as ever)."""
    return slice_of(printable(key), num_slices)


def _token_counter() -> tuple[str, Callable[[str], int]]:
    """(label, fn(str) -> int) for the caption-length histogram: bmclip's tokenizer when available."""
    try:
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
# per-package processing (runs in worker processes)


_DOI_PREFIX = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:\s*)", re.IGNORECASE)


def normalize_doi(doi: str | None) -> str | None:
    """A DOI as one spelling (str, None for none): whitespace stripped, a ``https://doi.org/`` (``dx.``, ``http``)
    or ``doi:`` prefix dropped, lower-cased (DOIs are case-insensitive)."""
    if not doi:
        return None
    d = _DOI_PREFIX.sub("", doi.strip()).strip().lower()
    return d or None


def article_identifiers(pmcid: str | None, doi: str | None, pmid: str | None) -> list[str]:
    """The identifiers an article carries, normalised, in this order: ``PMC1234567``, ``doi:<normalize_doi>``,
    ``pmid:<digits>`` (those it has; PMID leading zeros dropped). Two copies of an article given by different
    sources (a PMC package with PMCID and DOI, the preprint server's own JATS with the DOI only) share one."""
    ids = []
    if pmcid and pmcid.strip():
        ids.append(pmcid.strip())
    d = normalize_doi(doi)
    if d:
        ids.append("doi:" + d)
    if pmid and pmid.strip():
        p = pmid.strip()
        ids.append("pmid:" + ((p.lstrip("0") or "0") if p.isdigit() else p))
    return ids


def _article_id(art: jats.Article, xml_sha: str, index: int, n_articles: int) -> str:
    """The article's ID (its samples' ``article_id`` and key part): PMCID, else DOI, else PMID, else a hash of
    its XML file (``xml:<16 hex>``, ``#i`` for the i-th article of an articleset). Never the package's path, so
    the same article given as a folder, a tarball or in PMC Cloud layout gets one ID. Article-level dedup uses
    all of its identifiers (:func:`article_identifiers`), and the split its DOI first (merge.split_key)."""
    ids = article_identifiers(art.pmcid, art.doi, art.pmid)
    if ids:
        return ids[0]
    return f"xml:{xml_sha}" if n_articles == 1 else f"xml:{xml_sha}#{index}"


def _cloud_metadata(meta, skips: Counter) -> dict:
    """PMC Cloud metadata as the builder uses it: a dict whose ``license_code``/``license`` are strings.

    JSON that is not an object, or a licence field that is not a string (a number, an object), is counted once
    as ``bad_cloud_metadata``; the unusable part is dropped (no licence from the metadata: ``unknown``).
    """
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        skips["bad_cloud_metadata"] += 1
        return {}
    bad = [k for k in ("license_code", "license") if meta.get(k) is not None and not isinstance(meta[k], str)]
    if bad:
        skips["bad_cloud_metadata"] += 1
        meta = {k: v for k, v in meta.items() if k not in bad}
    return meta


def _figure_key(art_part: str, fig_id: str | None, fi: int, used: set[str]) -> str:
    """The sample key of figure ``fi`` (0-based) of an article: ``{article}_{figure id}``, made unique among
    ``used`` (the article's keys so far) by ``_{fi + 1}``, then ``_{fi + 1}_{n}`` (n = 2, 3, ...) if that is taken
    too (ids ``A``, ``A_3``, ``A``). Deterministic: the same document gives the same keys on every run."""
    key = f"{art_part}_{sanitize_key(fig_id or f'fig{fi + 1}', 40)}"
    if key in used:
        base = f"{key}_{fi + 1}"
        key, n = base, 2
        while key in used:
            key, n = f"{base}_{n}", n + 1
    return key


class _MediaCache:
    """Each media file of a package decoded and encoded once (many ``<fig>``s may point at one image): the
    :class:`~bmclip.data.pmc.media.ProcessedImage` (shared by their samples, so its JPEG is held and staged
    once) or the (reason, message) of the ImageSkip it raised, by file name."""

    def __init__(self, media, opts: BuildOptions):
        self.media, self.opts = media, opts
        self.done: dict[str, ProcessedImage | tuple[str, str]] = {}

    def get(self, name: str) -> ProcessedImage:
        """The processed image of media file ``name``; raises ImageSkip (a new one each time) if it is refused."""
        r = self.done.get(name)
        if r is None:
            o = self.opts
            try:
                r = process_image(self.media[name], max_side=o.max_side, quality=o.jpeg_quality,
                                  max_pixels=o.max_pixels, min_side=o.min_side, max_aspect=o.max_aspect,
                                  passthrough=o.jpeg_passthrough)
            except ImageSkip as e:
                r = (e.reason, str(e))
            self.done[name] = r
        if isinstance(r, tuple):
            raise ImageSkip(*r)
        return r


def process_package(
    pkg: Package, opts: BuildOptions, count_tokens: Callable[[str], int], storage_options: dict | None = None
) -> dict:
    """Process one package into a staging record: {'key', 'skips', 'articles', 'samples'}.

    ``storage_options`` go to fsspec when the package is remote.

    Every figure ends as one sample or one counted reason in ``skips['figure']``; package-level and
    article-level problems go to ``skips['package']`` / ``skips['article']``. Samples carry the JPEG
    bytes under ``'_jpeg'``.
    """
    fig_skips: Counter = Counter()
    pkg_skips: Counter = Counter()
    art_skips: Counter = Counter()
    rec = {"key": pkg.key, "articles": [], "samples": []}
    try:
        content = read_package(pkg, opts.max_member_bytes, opts.max_package_bytes, storage_options)
    except PackageError as e:
        pkg_skips[e.reason] += 1
        rec["skips"] = {"package": dict(pkg_skips), "article": {}, "figure": {}}
        rec["errors"] = [printable(str(e))]
        return rec
    pkg_skips.update(content.skips)
    errors: list[str] = []
    articles = []  # (article, sha of its XML file, index in that file, articles in that file)
    for name, data in content.xml:
        try:
            parsed = jats.parse_jats(data)
        except jats.NotJatsError:
            pkg_skips["non_jats_xml"] += 1
            continue
        except (DataError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            pkg_skips["xml_error"] += 1
            errors.append(printable(f"{pkg.key}/{name}: {str(e).replace('<bytes>: ', '')}"))
            continue
        parsed = parsed if isinstance(parsed, list) else [parsed]
        xml_sha = hashlib.sha256(data).hexdigest()[:16]
        articles.extend((art, xml_sha, i, len(parsed)) for i, art in enumerate(parsed))
    if not content.xml:
        pkg_skips["no_xml"] += 1
    media_names = {n.lower(): n for n in content.media}
    images = _MediaCache(content.media, opts)
    tokens: dict[str, int] = {}  # caption -> token count: figures repeating a caption are tokenized once
    meta = _cloud_metadata(content.meta, pkg_skips)
    ids_here: set[str] = set()
    for art, xml_sha, ai, n_in_file in articles:
        aid = _article_id(art, xml_sha, ai, n_in_file)
        ids = article_identifiers(art.pmcid, art.doi, art.pmid) or [aid]
        licence = art.license or meta.get("license_code") or meta.get("license")
        arec = {"id": aid, "ids": ids, "figures": len(art.figures)}
        rec["articles"].append(arec)
        if meta.get("is_retracted") is True:
            # every copy of a retracted article is skipped as such (the merge also skips its copies in other
            # packages, whatever their order: complete.json lists the identifiers of retracted articles)
            art_skips["retracted"] += 1
            fig_skips["retracted"] += len(art.figures)
            arec["retracted"] = True
            ids_here.update(ids)
            continue
        if not ids_here.isdisjoint(ids):  # the same article again in this package (an articleset repeating it,
            arec["repeat"] = True  # by any identifier): the first copy is used, this one counted here (the merge
            art_skips["duplicate_article"] += 1  # only counts its figures)
            fig_skips["duplicate_article"] += len(art.figures)
            ids_here.update(ids)
            continue
        ids_here.update(ids)
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
            if len(caption) > opts.max_caption_chars:
                # before anything costs memory in proportion to it (tokenizer, subcaptions, the staged chunk)
                fig_skips["caption_too_long"] += 1
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
                    img = images.get(chosen)
                    break
                except ImageSkip as e:
                    first_skip = first_skip or e.reason
                    if e.reason not in ("undecodable_image", "empty_image"):
                        break  # size/aspect/bomb describe the figure: another format of it will not help
            if img is None:
                fig_skips[first_skip] += 1
                continue
            key = _figure_key(article_key_part(aid), fig.id, fi, used_keys)
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
            n_tokens = tokens.get(caption)
            if n_tokens is None:
                n_tokens = tokens[caption] = count_tokens(caption)
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
                    "tokens": n_tokens,
                    "_jpeg": img.jpeg,
                }
            )
    rec["skips"] = {"package": dict(pkg_skips), "article": dict(art_skips), "figure": dict(fig_skips)}
    if errors:
        rec["errors"] = errors
    return rec


def _process_package_guarded(
    pkg: Package, opts: BuildOptions, count_tokens: Callable[[str], int], storage_options: dict | None = None
) -> dict:
    """process_package, with any unexpected exception turned into a counted package skip.

    One pathological package must not stop a multi-day build: it is recorded as ``internal_error``
    with its message in ``first_errors`` (and so can be reported and fixed), and the run goes on. A remote
    input that cannot be read (InputReadError, after retries) is not the package's fault: it stops the stage
    (its chunk is not written; a rerun redoes it).
    """
    try:
        return process_package(pkg, opts, count_tokens, storage_options)
    except InputReadError:
        raise
    except Exception as e:
        return {
            "key": pkg.key,
            "articles": [],
            "samples": [],
            "skips": {"package": {"internal_error": 1}, "article": {}, "figure": {}},
            "errors": [printable(f"{pkg.key}: internal error {type(e).__name__}: {e}")],
        }


# --------------------------------------------------------------------------------------------------
# chunk files


def _encode_chunk(index: int, records: list[dict]) -> bytes:
    """The chunk file of ``records``; samples with equal JPEG bytes (figures sharing one image) share them."""
    blobs: list[bytes] = []
    at: dict[bytes, int] = {}
    off = 0
    for r in records:
        for s in r["samples"]:
            jpg = s.pop("_jpeg")
            o = at.get(jpg)
            if o is None:
                o = at[jpg] = off
                off += len(jpg)
                blobs.append(jpg)
            s["offset"], s["length"] = o, len(jpg)
    header = json.dumps({"version": _STAGING_VERSION, "chunk": index, "packages": records}, sort_keys=True)
    hb = header.encode("utf-8")
    return b"".join([_CHUNK_MAGIC, struct.pack("<QQ", len(hb), off), hb, *blobs])


def _decode_chunk(data: bytes, where: str) -> tuple[list[dict], bytes]:
    if len(data) < 24 or data[:8] != _CHUNK_MAGIC:
        raise DataError(f"{where}: not a bmclip staging chunk")
    hlen, blen = struct.unpack("<QQ", data[8:24])
    if len(data) != 24 + hlen + blen:
        raise DataError(f"{where}: staging chunk has {len(data)} bytes, expected {24 + hlen + blen} (corrupt)")
    try:
        header = json.loads(data[24 : 24 + hlen])
        return header["packages"], data[24 + hlen :]
    except (ValueError, KeyError) as e:
        raise DataError(f"{where}: corrupt staging chunk header ({e}); delete it and rerun the stage") from e


def staging_stream(staging: StagingDir | str | os.PathLike) -> Iterator[tuple[dict, bytes]]:
    """The package records of a complete staging dir (local or remote) in package-key order, each with its
    chunk's JPEG blob; remote chunks are read one at a time into memory."""
    st = staging if isinstance(staging, StagingDir) else StagingDir(staging)
    try:
        complete = st.read("complete.json")
        if complete is None:
            raise DataError(f"staging dir {st} is not complete (no complete.json): rerun its stage command")
        n = json.loads(complete)["chunks"]
        for name, data in st.read_ahead([chunk_name(i) for i in range(n)]):
            if data is None:
                raise DataError(f"staging dir {st} lacks {name}: rerun its stage command")
            records, blob = _decode_chunk(data, f"{st}/{name}")
            for r in records:
                yield r, blob
    finally:
        if st is not staging:
            st.close()


# --------------------------------------------------------------------------------------------------
# the stage: plan, chunk tasks, process pool

_WORKER_TOKENS = None  # (label, counter) of this process, made on its first chunk


def _chunk_task(args) -> tuple[int, int, dict]:
    """Process one chunk of packages and write its staging file (runs in a worker process)."""
    return _chunk_task_impl(args)


def _chunk_task_impl(args) -> tuple[int, int, dict]:
    index, packages, staging, opts_dict, storage_options, staging_storage_options = args
    global _WORKER_TOKENS
    if _WORKER_TOKENS is None:
        _WORKER_TOKENS = _token_counter()
    opts = BuildOptions(**opts_dict)
    records = [_process_package_guarded(p, opts, _WORKER_TOKENS[1], storage_options) for p in packages]
    for r in records:
        r["tokenizer"] = _WORKER_TOKENS[0]
    n = sum(len(r["samples"]) for r in records)
    retracted = _retracted_ids(records)
    with StagingDir(staging, staging_storage_options) as st:
        if retracted:  # before the chunk, whose existence says the chunk (and this list) is done
            st.write(retracted_name(index), json.dumps({"ids": retracted}).encode())
        st.write(chunk_name(index), _encode_chunk(index, records))
    errors = [e for r in records for e in r.get("errors", ())]
    return index, n, {"packages": len(packages), "errors": errors[:5], "retracted": retracted}


def _retracted_ids(records: list[dict]) -> list[str]:
    """The identifiers of the articles that records flag as retracted (sorted, unique)."""
    return sorted({i for r in records for a in r["articles"] if a.get("retracted") for i in a.get("ids", ())})


def _worker_init(parent_pid: int) -> None:
    """Start of a build worker: die with the process that started it, and die at once on SIGTERM.

    A fork inherits the parent's Python SIGTERM handler (the CLI's, which raises): reset to the default, so
    that a worker told to stop stops, mid-chunk if need be (a chunk is written atomically; the rerun redoes
    it). On Linux the kernel sends SIGTERM to the worker when its parent dies, even by SIGKILL or the OOM
    killer: without that, workers blocked on the task queue would outlive a killed build forever.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


def _run_pool(tasks: list, workers: int, account: Callable[[tuple], None]) -> None:
    """Run chunk tasks on a process pool, at most 4 per worker in flight (bounded memory).

    ProcessPoolExecutor rather than multiprocessing.Pool: a worker killed by the OOM killer surfaces
    as BrokenProcessPool (reported as a DataError telling the user to rerun and resume) instead of an
    eternal hang. Interrupted (SIGINT, or SIGTERM through the CLI's handler), the pool does not wait for the
    chunks in flight: queued tasks are cancelled and the workers terminated, so the command exits at once
    and leaves no process behind; the finished chunks are kept for the rerun.
    """
    pending = iter(tasks)
    in_flight: set = set()
    ex = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(os.getpid(),))
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
        ex.shutdown(wait=True, cancel_futures=True)
        raise DataError(
            "a build worker process died (out of memory or killed); finished chunks are kept: "
            "rerun the same command to resume"
        ) from e
    except BaseException:
        _terminate_pool(ex)
        raise
    ex.shutdown(wait=True)


def _terminate_pool(ex: ProcessPoolExecutor) -> None:
    """Cancel what is queued, terminate the workers (mid-chunk is fine: chunks are atomic) and reap them."""
    # The executor exposes no way to stop running tasks; its worker processes are in ``_processes``
    # (pid -> Process) in every CPython from 3.8 on.
    procs = list((getattr(ex, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    ex.shutdown(wait=True, cancel_futures=True)
    for p in procs:
        p.join(timeout=5)


def check_apart_from_inputs(inputs: list, places: dict[str, str | os.PathLike | None]) -> None:
    """Raise ConfigError when a place the build writes (``places``: what -> path, e.g. ``{"output folder": ...,
    "staging dir": ...}``; None and remote ones are not checked) is a local input, lies inside one, or holds one.

    Inside an input, a later run (or a resumed one) would take the build's own shards (``train-000000.tar``) for
    package tarballs; an input inside the output or the staging dir is not safe either: the merge deletes
    shard-named files there and the staging dir is removed after a build. Paths are compared resolved
    (symbolic links followed).
    """
    ins = [(i, local_path(i).resolve()) for i in inputs if not is_remote(i)]
    for what, place in places.items():
        if place is None or is_remote(place):
            continue
        p = local_path(place).resolve()
        for given, i in ins:
            if p == i or i in p.parents:
                rel = "is" if p == i else "is inside"
                raise ConfigError(printable(f"the {what} {place} {rel} the input {given}: a later run would read "
                                            f"its files as packages; write it outside the inputs"))
            if p in i.parents:
                raise ConfigError(printable(f"the input {given} is inside the {what} {place}, which the build "
                                            f"rewrites and deletes files in; move it, or write elsewhere"))


def _plan_digest(keys: list[str]) -> str:
    h = hashlib.sha256()
    for k in keys:
        h.update(_key_bytes(k) + b"\n")
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
    storage_options: dict | None = None,
    staging_storage_options: dict | None = None,
) -> dict:
    """Process the inputs' packages (one slice of them) into resumable staging chunks; returns a summary dict.

    ``num_slices``/``slice_index`` keep the packages whose ``sha256(key) % num_slices == slice_index``.
    Inputs may be remote URLs (:func:`~bmclip.data.pmc.sources.discover_packages`); ``storage_options`` go
    to fsspec for them. The staging dir is a local folder or a remote prefix (:class:`StagingDir`;
    ``staging_storage_options`` go to fsspec for it). Storage options are never written to the staging dir.
    """
    opts = options or BuildOptions()
    opts.validate()
    if num_slices < 1 or not 0 <= slice_index < num_slices:
        raise ConfigError(f"slice must be in [0, {num_slices}), got {slice_index}")
    if num_workers is not None and (not is_int(num_workers) or num_workers < 0):
        raise ConfigError(f"workers must be an integer >= 0 (0: no worker processes), got {num_workers!r}")
    if not inputs:
        raise ConfigError("no inputs given")
    if not isinstance(staging, StagingDir):
        check_apart_from_inputs(list(inputs), {"staging dir": staging})
    passed_over: list[tuple[str, str]] = []
    packages, _ = discover_packages(list(inputs), passed_over, storage_options)
    if num_slices > 1:
        packages = [p for p in packages if _slice_of(p.key, num_slices) == slice_index]
        passed_over = [(r, k) for r, k in passed_over if _slice_of(k, num_slices) == slice_index]
    disc_skips = Counter(r for r, _k in passed_over)
    with StagingDir(staging, staging_storage_options) as st:
        return _stage(st, packages, disc_skips, opts, num_slices, slice_index, num_workers, progress,
                      storage_options)


def _stage(st: StagingDir, packages: list[Package], disc_skips: Counter, opts: BuildOptions, num_slices: int,
           slice_index: int, num_workers: int | None, progress: bool, storage_options: dict | None) -> dict:
    st.prepare()
    st.lock()  # before anything is read or cleaned up: another live build may be writing here
    plan = {
        "version": _STAGING_VERSION,
        "options": opts.stage_dict(),
        "num_slices": num_slices,
        "slice": slice_index,
        "num_packages": len(packages),
        "packages_sha256": _plan_digest([p.key for p in packages]),
        "discovery_skips": dict(sorted(disc_skips.items())),
    }
    old_plan = st.read("plan.json")
    if old_plan is not None:
        old = json.loads(old_plan)
        # a plan written before a stage option existed recorded none for it: the default (as the merge reads it)
        old["options"] = BuildOptions.stage_dict_of_plan(old.get("options", {}))
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise ConfigError(
                f"staging dir {st} was made by a different run (differs in: {', '.join(diff)}); "
                "rerun with the same inputs/options, or use an empty staging dir"
            )
    else:
        st.write("plan.json", json.dumps(plan, indent=1, sort_keys=True).encode())
    st.remove_partial()  # a killed run's half-written chunk
    cs = opts.chunk_size
    chunks = [packages[i : i + cs] for i in range(0, len(packages), cs)]
    names = st.chunk_dir_names()
    pending = [i for i in range(len(chunks)) if chunk_name(i).rsplit("/", 1)[-1] not in names]
    done_before = len(chunks) - len(pending)
    retracted: set[str] = set()  # identifiers of retracted articles, of every chunk (complete.json "retracted")
    waiting = set(pending)
    for i in range(len(chunks)):
        if i not in waiting and retracted_name(i).rsplit("/", 1)[-1] in names:  # a chunk a killed run finished
            retracted.update(json.loads(st.read(retracted_name(i)))["ids"])
    location = st.url if st.remote else str(st.path)
    tasks = [(i, chunks[i], location, asdict(opts), storage_options, st.storage_options) for i in pending]
    workers = num_workers if num_workers is not None else (os.cpu_count() or 1)
    workers = max(0, min(workers, len(tasks)))
    if workers > 1 and st.remote and st.url.split("::")[-1].startswith("memory://"):
        raise ConfigError(f"{st}: a memory:// staging dir is only seen by the process that writes it; use -j 0")
    # a stage stopped before its first chunk came back still says so: the operator learns where it stood
    bar = Progress(f"stage {st.name}", "pkg", total=sum(len(chunks[i]) for i in pending), enabled=progress,
                   silent_if_empty=False)
    samples = 0
    errors: list[str] = []

    def account(result: tuple[int, int, dict]) -> None:
        nonlocal samples
        _i, n, info = result
        samples += n
        errors.extend(info["errors"])
        retracted.update(info["retracted"])
        bar.set_postfix(pairs=samples)
        bar.update(info["packages"])

    try:
        if workers <= 1:
            for t in tasks:
                account(_chunk_task(t))
        else:
            _run_pool(tasks, workers, account)
    finally:
        bar.close()
    summary = {
        "staging": str(st),
        "packages": len(packages),
        "chunks": len(chunks),
        "chunks_resumed": done_before,
        "samples_staged_now": samples,
        "first_errors": errors[:20],
    }
    complete = json.dumps({"chunks": len(chunks), **plan, "retracted": sorted(retracted)}, sort_keys=True).encode()
    st.write("complete.json", complete)
    return summary
