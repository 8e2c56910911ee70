"""The PMC figure-caption dataset builder: stage (parallel, resumable, sliceable) then merge (dedup, split, shards).

Pipeline
--------
1. **Discover** packages under the inputs (:mod:`bmclip.data.pmc.sources`, the one place that knows where
   inputs come from and how a package is read), sorted by package key (the path relative to the input,
   prefixed with the input's name). ``num_slices``/``slice_index`` keep the packages whose
   ``sha256(key) % num_slices == slice_index``.
2. **Stage** (:mod:`bmclip.data.pmc.stage`): a process pool turns chunks of packages into figure-caption
   samples, one atomically written chunk file per chunk; a killed run rerun with the same command redoes only
   the missing chunks and never duplicates or loses a pair.
3. **Merge** (:mod:`bmclip.data.pmc.merge`) one or many staging dirs (slices) as one stream in global
   package-key order, so the output does not depend on the number of workers or slices: duplicate articles
   and images are dropped, each article goes to one split by ``sha256(seed:PMCID)``, and samples go to
   ``{split}-{000000..}.tar`` webdataset shards with DALI ``.idx`` files beside them
   (:mod:`bmclip.data.pmc.shard_writer`), then ``stats.json`` (+ PNG plots, :mod:`bmclip.data.pmc.stats`),
   ``sizes.json`` (shard name -> samples, what open_clip_train reads) and ``manifest.json``.

Options are :class:`~bmclip.data.pmc.options.BuildOptions`. Split fractions default to PMC-15M's
(BiomedCLIP paper: 13.9M train / 13.6k val / 725,739 test of 15,282,336 pairs): ``val_fraction = 13_600 /
15_282_336 ≈ 0.00089``, ``test_fraction = 725_739 / 15_282_336 ≈ 0.0475``.

Shard samples are in sorted key order, each sample's members sorted by extension (fixed mtime 0 / uid 0 /
empty owner names, ``KEY`` without dots): ``KEY.jpg`` (JPEG, longest side <= max_side; RGB, or a
passed-through greyscale source), ``KEY.json`` (pmcid, pmid, doi, figure id and label, licence, original
and stored image size, href and media file, subcaptions), ``KEY.txt`` (caption, UTF-8).

Slurm array example (4 machines/tasks, then one merge)::

    #SBATCH --array=0-3
    bmclip build-dataset /data/oa_package --staging /scratch/pmc_stage/$SLURM_ARRAY_TASK_ID \\
        --num-slices 4 --slice $SLURM_ARRAY_TASK_ID --workers $SLURM_CPUS_PER_TASK
    # after the array (sbatch --dependency=afterok:<array job id>):
    bmclip build-dataset merge /scratch/pmc_stage/{0,1,2,3} --output /data/pmc15m_shards

A failed array task is simply resubmitted with the same command: it resumes its own staging dir.

Remote inputs and outputs (fsspec; extra ``bmclip[cloud]``)::

    bmclip build-dataset s3://my-mirror/oa_package/ --output s3://my-bucket/pmc15m/ --staging /scratch/pmc_stage \
        --storage-option endpoint_url=https://s3.example.org

reads the packages straight from the bucket (streamed) and uploads each shard as it is finished. Without
``--staging`` a remote build stages into ``OUTPUT/_staging`` (objects under the output prefix, written from
memory and read back one chunk at a time), so it needs local disk for a few shards only. See
``docs/build_dataset.md``.
"""

from __future__ import annotations

import os

from bmclip.data.pmc.merge import merge_staging, split_of
from bmclip.data.pmc.options import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, SPLITS, BuildOptions
from bmclip.data.pmc.stage import check_apart_from_inputs, sanitize_key, stage
from bmclip.data.pmc.staging import StagingDir
from bmclip.data.pmc.stats import licence_code, summary_lines
from bmclip.io.fs import is_remote, local_path

__all__ = [
    "DEFAULT_TEST_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "SPLITS",
    "BuildOptions",
    "build",
    "build_dataset",
    "licence_code",
    "merge_staging",
    "sanitize_key",
    "split_of",
    "stage",
    "summary_lines",
]


def build(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    options: BuildOptions,
    *,
    staging: str | os.PathLike | None = None,
    keep_staging: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    storage_options: dict | None = None,
    input_storage_options: dict | None = None,
    output_storage_options: dict | None = None,
) -> dict:
    """Stage ``inputs`` into ``staging`` (default ``output/_staging``), merge it into ``output``; returns stats.

    Inputs, output and staging may be remote URLs (``s3://bucket/prefix/`` ...): inputs are streamed, output
    shards are uploaded as they are finished, staging chunks are written from memory and read back one at a
    time. fsspec gets ``storage_options`` updated with ``input_storage_options`` for the inputs and with
    ``output_storage_options`` for the output and the staging dir. The staging dir defaults to
    ``output/_staging`` (also for a remote output: a prefix below it); it is removed afterwards unless
    ``keep_staging``. Rerunning the same call after a crash resumes from the staging dir.
    """
    if staging is None:
        staging = f"{os.fspath(output).rstrip('/')}/_staging" if is_remote(output) else local_path(output) / "_staging"
    # before anything is made: an output or staging dir among the inputs is refused (see check_apart_from_inputs)
    check_apart_from_inputs(list(inputs), {"output folder": output, "staging dir": staging})
    in_so = {**(storage_options or {}), **(input_storage_options or {})}
    out_so = {**(storage_options or {}), **(output_storage_options or {})}
    with StagingDir(staging, out_so) as st:
        stage(inputs, st.url if st.remote else st.path, options, num_workers=num_workers, progress=progress,
              storage_options=in_so, staging_storage_options=out_so)
        stats = merge_staging([st], output, options, progress=progress, storage_options=out_so)
        if not keep_staging:
            st.remove()
    return stats


def build_dataset(inputs: list[str | os.PathLike], output: str | os.PathLike, **options) -> dict:
    """Build webdataset shards from PMC inputs into ``output`` (stage + merge); returns the stats dict.

    Options: any :class:`BuildOptions` field (``max_side=512, shard_size=1000, min_caption_chars=10,
    min_side=64, max_aspect=10.0, near_dup_threshold=7, val_fraction, test_fraction, seed=0, ...``) plus
    ``num_workers`` (default: all cores; 0/1 = in process), ``staging`` (default ``output/_staging``; a local
    path or a remote prefix), ``keep_staging`` (default False), ``progress`` (default True) and
    ``storage_options`` / ``input_storage_options`` / ``output_storage_options`` (fsspec options for remote
    inputs and output, see :func:`build`). Rerunning the same call after a crash resumes from the staging dir.
    """
    run = {k: options.pop(k) for k in list(options) if k in _RUN_KEYS}
    opts = BuildOptions.from_kwargs(**options)
    return build(inputs, output, opts, **run)


_RUN_KEYS = ("num_workers", "staging", "keep_staging", "progress", "storage_options", "input_storage_options",
             "output_storage_options")
