"""Merge: complete staging dirs -> deduplicated, split webdataset shards, stats, sizes and manifest.

One or many staging dirs (slices) are read as one stream in global package-key order (k-way merge), so the
output does not depend on the number of workers or slices: duplicate articles (a copy sharing any identifier,
PMCID, DOI or PMID, with an earlier one) keep the first, every copy of an article that any copy says is retracted
is skipped (the staging dirs' complete.json list them, so order does not matter), exact and near-duplicate images
keep the first (:mod:`~bmclip.data.pmc.dedup`), each article goes to one split by ``sha256(seed:split_key)``
(:func:`split_key`: the DOI first), and samples go to ``{split}-{000000..}.tar``
webdataset shards of ``shard_size`` samples (:mod:`~bmclip.data.pmc.shard_writer`), then ``stats.json``
(+ ``stats.png``), ``sizes.json`` (shard name -> samples, what open_clip_train reads) and ``manifest.json``.

The output is a local folder (or ``file://`` URL), or a remote prefix (``s3://bucket/prefix/``, ``gs://...``):
then each finished shard is uploaded at once (:class:`~bmclip.data.pmc.upload.RemoteOutput`, retried) from a
local work folder (``_upload`` in the first staging dir, or a temporary folder when that staging dir is
remote) and deleted there, and the small JSON/PNG files follow at the end, ``manifest.json`` last. Staging
dirs may be remote prefixes too (:class:`~bmclip.data.pmc.staging.StagingDir`): their chunks are read one
at a time into memory, never copied to disk. Either way a merge killed at any point is redone by rerunning it,
and gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from bmclip.data.pmc.dedup import Deduplicator
from bmclip.data.pmc.options import SPLITS, BuildOptions
from bmclip.data.pmc.shard_writer import SAMPLE_MEMBERS, ShardWriter
from bmclip.data.pmc.stage import article_identifiers, article_key_part, staging_stream
from bmclip.data.pmc.staging import LOCK_NAME, BuildLock, StagingDir, remove_partial_files
from bmclip.data.pmc.stats import STATS_FORMAT, BuildStats, write_plots
from bmclip.data.pmc.upload import RemoteOutput
from bmclip.errors import ConfigError, DataError
from bmclip.io import atomic_write_bytes
from bmclip.io.fs import is_remote, local_path
from bmclip.progress import Progress

__all__ = ["merge_staging", "split_key", "split_of"]

_SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.(tar|idx)$")
_FINAL_FILES = ("stats.json", "stats.png", "sizes.json", "manifest.json")  # written in this order


def split_key(pmcid: str | None, doi: str | None, pmid: str | None, article_id: str) -> str:
    """What an article's split is drawn from: ``doi:<normalised DOI>`` when it has a DOI, else its PMCID, else
    ``pmid:<PMID>``, else its ``article_id`` (``xml:...``).

    The DOI first because it is the identifier that every copy of an article is most likely to carry: the PMC
    package (PMCID, DOI, PMID), PMC Cloud, Europe PMC, and the publisher's or preprint server's own JATS (DOI
    only). Copies with disjoint identifiers (an old PMC article without a DOI, and a publisher copy with one) are
    still one article for dedup when they share another identifier, but two builds that keep different copies
    may then draw different splits for it.
    """
    ids = article_identifiers(pmcid, doi, pmid)
    for prefix in ("doi:", "PMC", "pmid:"):
        for i in ids:
            if i.startswith(prefix):
                return i
    return article_id


def split_of(article_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Split of an article from sha256(f'{seed}:{article_id}') mapped to [0, 1): test, then val, then train.

    The merge passes the article's :func:`split_key` as ``article_id``."""
    h = hashlib.sha256(f"{seed}:{article_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _read_plans(stagings: list[StagingDir]) -> list[dict]:
    plans = []
    for s in stagings:
        plan = s.read("plan.json")
        if plan is None:
            raise DataError(f"{s} is not a staging dir (no plan.json)")
        plans.append(json.loads(plan))
    # a plan written before a stage option existed is taken as made with its default (as a resumed stage does)
    if len({json.dumps(BuildOptions.stage_dict_of_plan(p["options"]), sort_keys=True) for p in plans}) > 1:
        raise ConfigError("staging dirs were made with different stage options; they cannot be merged")
    versions = sorted({int(p.get("version", 0)) for p in plans})
    if len(versions) > 1:
        # their fingerprints, captions and figure images are made differently: restage the older ones
        raise ConfigError(f"staging dirs were made by different builder versions (staging formats "
                          f"{', '.join(map(str, versions))}); they cannot be merged: restage the older ones")
    return plans


def _retracted(stagings: list[StagingDir]) -> set[str]:
    """The identifiers of retracted articles that the staging dirs' stages found (none from a stage of a version
    before 4, which did not list them: there only the copy carrying the flag is skipped)."""
    out: set[str] = set()
    for s in stagings:
        complete = s.read("complete.json")
        if complete is not None:
            out.update(json.loads(complete).get("retracted", ()))
    return out


def _unique_key(key: str, article_id: str, used: set[str]) -> str:
    """``key`` when no sample written so far has it, else a deterministic variant no sample has.

    Two articles can sanitize to one key part (DOIs ``10.1000/x.y`` and ``10.1000/x_y`` both give
    ``10_1000_x_y``): the later one's colliding samples get the first 8 hex digits of sha256 of its unsanitized
    article ID after that part (``10_1000_x_y_<8 hex>_F2``). A staging dir of an earlier version may also repeat
    a key within an article; any key still taken gets ``_<8 hex>`` of sha256(article ID, key, n) appended (n = 0,
    1, ... until free). Without this a shard held two samples of one key (a webdataset reader keeps one) while
    the counts said two. The merge order is global and fixed: the first sample keeps its key, and the renamed
    ones get the same names on every run, resumed or not, whatever the slices.
    """
    if key not in used:
        return key
    part = article_key_part(article_id)
    if key.startswith(part + "_"):
        new = f"{part}_{_hex8(article_id)}{key[len(part):]}"
        if new not in used:
            return new
    n = 0
    while True:
        new = f"{key}_{_hex8(chr(10).join((article_id, key, str(n))))}"
        if new not in used:
            return new
        n += 1


def _hex8(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def merge_staging(
    stagings: list[str | os.PathLike],
    output: str | os.PathLike,
    options: BuildOptions | None = None,
    *,
    progress: bool = True,
    storage_options: dict | None = None,
    staging_storage_options: dict | None = None,
) -> dict:
    """Merge complete staging dirs into deduplicated, split webdataset shards + manifest + stats; returns stats.

    ``output`` is a local folder or a remote prefix URL (``storage_options`` go to fsspec for it); staging
    dirs are local folders or remote prefixes (``staging_storage_options``, default ``storage_options``).
    """
    opts = options or BuildOptions()
    opts.validate()
    if not stagings:
        raise ConfigError("merge needs at least one staging dir")
    st_so = storage_options if staging_storage_options is None else staging_storage_options
    dirs = [s if isinstance(s, StagingDir) else StagingDir(s, st_so) for s in stagings]
    remote = None
    try:
        for d in dirs:
            d.lock()  # a stage or merge still running there would lose its files to this merge
        plans = _read_plans(dirs)
        remote = RemoteOutput(os.fspath(output), storage_options) if is_remote(output) else None
        return _merge(dirs, plans, output, remote, opts, progress)
    finally:
        if remote is not None:
            remote.close()
        for d, s in zip(dirs, stagings):
            if d is not s:
                d.close()


def _upload_folder(stagings: list[StagingDir], output: str) -> tuple[Path, BuildLock | None]:
    """The local folder where a merge into a remote output writes shards until they are uploaded, and the lock
    held on it: ``_upload`` in the first staging dir when that is local (that dir's lock covers it), else
    ``bmclip-merge-<hash of the output URL>`` in the temporary directory (``TMPDIR``), so that a rerun of a killed
    merge finds and clears it, locked (``.lock`` beside it) so that a second merge of that output on this
    machine is refused instead of deleting the first one's shards."""
    lock = None
    if stagings[0].remote:
        digest = hashlib.sha256(os.fspath(output).rstrip("/").encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir()) / f"bmclip-merge-{digest}"
        lock = BuildLock(out.with_name(out.name + ".lock"), f"output {os.fspath(output)} (merge folder {out})",
                         "two merges into one output would delete each other's shards", remove=True)
        lock.acquire()
    else:
        out = stagings[0].path / "_upload"
    try:
        if out.exists():  # a killed merge's leftovers: redone
            shutil.rmtree(out)
        out.mkdir(parents=True)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return out, lock


def _merge(stagings: list[StagingDir], plans: list[dict], output, remote: RemoteOutput | None,
           opts: BuildOptions, progress: bool) -> dict:
    if remote is None:
        out = local_path(output)
        out.mkdir(parents=True, exist_ok=True)
        # Two merges into one folder (other staging dirs, so their own locks do not meet) would overwrite each
        # other's shards, and each one's start deletes the temporary files of the other's shards in progress.
        with BuildLock(out / LOCK_NAME, f"output folder {out}",
                       "two merges into one output would overwrite each other's shards", remove=True):
            remove_partial_files(out)
            return _merge_into(stagings, plans, out, remote, opts, progress)
    # Shards are written here, uploaded when finished and deleted.
    out, lock = _upload_folder(stagings, output)
    try:
        return _merge_into(stagings, plans, out, remote, opts, progress)
    finally:
        remote.close()  # no upload still reads from the folder
        shutil.rmtree(out, ignore_errors=True)
        if lock is not None:
            lock.release()


def _article_copies(rec: dict, stats: BuildStats, retracted: set[str], seen_ids: set[str]) -> dict[str, str]:
    """Count a staging record's articles and decide each copy: kept, ``retracted`` (any copy of it, in any package,
    is flagged: ``retracted`` holds their identifiers) or ``duplicate_article`` (it shares an identifier with an
    earlier copy). Returns article_id -> the reason its staged samples are dropped; each copy is counted once,
    under one reason."""
    dropped: dict[str, str] = {}
    for a in rec["articles"]:
        stats.articles += 1
        stats.figures += a["figures"]
        ids = a.get("ids") or [a["id"]]  # a staging dir of version < 4 has the article ID only
        if a.get("retracted"):  # the flagged copy: skipped and counted at stage time
            retracted.update(ids)
            seen_ids.update(ids)
            continue
        is_retracted = not retracted.isdisjoint(ids)
        if is_retracted:
            retracted.update(ids)  # a third copy sharing another of this copy's identifiers is the same article
        if a.get("repeat"):  # a second copy within its package: skipped and counted at stage time
            if is_retracted:  # as a duplicate there; it is a retracted article's copy
                stats.skip("article", "duplicate_article", -1)
                stats.skip("article", "retracted")
                stats.skip("figure", "duplicate_article", -a["figures"])
                stats.skip("figure", "retracted", a["figures"])
            seen_ids.update(ids)
            continue
        if is_retracted:
            dropped[a["id"]] = "retracted"
        elif not seen_ids.isdisjoint(ids):
            dropped[a["id"]] = "duplicate_article"
        seen_ids.update(ids)
        if a["id"] in dropped:
            stats.skip("article", dropped[a["id"]])
    return dropped


def _merge_into(stagings: list[StagingDir], plans: list[dict], out: Path, remote: RemoteOutput | None,
                opts: BuildOptions, progress: bool) -> dict:
    for name in ("sizes.json", "manifest.json"):
        # An earlier build's sample counts would describe shards this merge is about to replace: until it
        # finishes, the folder has none (a killed merge leaves no counts that disagree with its shards).
        if remote is None:
            (out / name).unlink(missing_ok=True)
        else:
            remote.delete(name)

    def upload(shard: dict, tar: Path, idx: Path) -> None:
        remote.submit([(tar, shard["name"]), (idx, shard["index"])])

    dedup = Deduplicator(opts.near_dup_threshold, opts.near_dup_max_mad) if opts.dedup else None
    writers = {s: ShardWriter(out, s, opts.shard_size, handoff=upload if remote else None) for s in SPLITS}
    stats = BuildStats()
    for p in plans:
        for reason, n in p.get("discovery_skips", {}).items():
            stats.skip("package", reason, n)
    retracted = _retracted(stagings)  # identifiers of retracted articles, grown by their other copies' identifiers
    seen_ids: set[str] = set()  # every identifier of every article copy so far
    written_keys: set[str] = set()  # every sample key in the shards (~100 bytes each; dedup keeps ~0.4 KB)
    merged = heapq.merge(*(staging_stream(s) for s in stagings), key=lambda rb: rb[0]["key"])
    bar = Progress("merge", "pkg", total=sum(int(p.get("num_packages", 0)) for p in plans) or None,
                   enabled=progress, silent_if_empty=False)
    try:
        for rec, blob in merged:
            bar.update(1)
            stats.add_package(rec)
            dropped = _article_copies(rec, stats, retracted, seen_ids)  # article_id -> why its samples are dropped
            split_seen = set()
            for s in rec["samples"]:
                m = s["meta"]
                why = dropped.get(m["article_id"])
                if why is not None:
                    stats.skip("figure", why)
                    continue
                reason = None
                if dedup is not None:
                    reason = dedup.check_and_add(s["sha"], s["dhash"], base64.b64decode(s["thumb"]))
                if reason:
                    stats.skip("figure", reason)
                    continue
                drawn_from = split_key(m.get("pmcid"), m.get("doi"), m.get("pmid"), m["article_id"])
                split = split_of(drawn_from, opts.seed, opts.val_fraction, opts.test_fraction)
                key = _unique_key(m["key"], m["article_id"], written_keys)
                if key != m["key"]:
                    stats.note(f"{rec['key']}: sample key {m['key']} (article {m['article_id']}) was taken by an "
                               f"earlier sample; written as {key}")
                    m["key"] = key
                written_keys.add(key)
                if m.get("license") is not None and not isinstance(m["license"], str):
                    m["license"] = None  # a non-string PMC Cloud license_code staged by an earlier version
                jpg = blob[s["offset"] : s["offset"] + s["length"]]
                js = json.dumps(m, sort_keys=True, ensure_ascii=False).encode("utf-8")
                writers[split].add(m["key"], jpg, js, s["caption"].encode("utf-8"))
                first = (m["article_id"], split) not in split_seen
                split_seen.add((m["article_id"], split))
                stats.add_pair(split, s, first_of_article=first)
        for w in writers.values():
            w.close_shard()
        if remote is not None:
            remote.wait()
    finally:
        bar.close()
    shards = [sh for s in SPLITS for sh in writers[s].shards]
    keep = {sh["name"] for sh in shards} | {sh["index"] for sh in shards}
    # Shard files left by an earlier, larger build into the same place, and (remote) temporary objects a
    # killed upload left where renames stand in for atomic PUTs.
    if remote is None:
        for f in out.iterdir():
            if _SHARD_FILE.match(f.name) and f.name not in keep:
                f.unlink()
    else:
        for name in sorted(remote.names()):
            stale = _SHARD_FILE.match(name) and name not in keep
            if stale or (name.startswith(".") and name.endswith(".tmp")):
                remote.delete(name)
    stats_dict = stats.as_dict(opts)
    manifest = {
        "format": STATS_FORMAT,
        "shards": shards,
        "splits": {
            s: {"num_shards": len(writers[s].shards), "num_samples": stats.pairs[s], "pattern": writers[s].pattern()}
            for s in SPLITS
        },
        "sample_members": list(SAMPLE_MEMBERS),
        "options": asdict(opts),
        "stagings": [str(s) for s in stagings],
    }
    atomic_write_bytes(json.dumps(stats_dict, indent=1, ensure_ascii=False).encode("utf-8"), out / "stats.json")
    write_plots(out / "stats.png", stats_dict)
    # open_clip_train (get_dataset_size) reads the sample count of each shard from
    # sizes.json beside the shards: shard file name -> samples.
    sizes = {sh["name"]: sh["num_samples"] for sh in sorted(shards, key=lambda sh: sh["name"])}
    atomic_write_bytes(json.dumps(sizes, indent=1).encode("utf-8"), out / "sizes.json")
    atomic_write_bytes(json.dumps(manifest, indent=1).encode("utf-8"), out / "manifest.json")
    if remote is not None:
        for name in _FINAL_FILES:  # manifest.json last: its presence says the output is complete
            remote.put(out / name, name)
    return stats_dict
