"""bmclip build-dataset with remote inputs and output: an S3 server on loopback (moto), real PMC fixtures.

Every remote build is compared object by object with a local build of the same inputs; faults are injected
below the code under test (the S3 client's upload, the remote file's read); kill-and-resume uses a builder
subprocess killed while it uploads.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

import fsspec  # noqa: E402
import s3fs  # noqa: E402
from fsspec.spec import AbstractBufferedFile  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from bmclip.cli import main  # noqa: E402
from bmclip.data.pmc import build_dataset, merge_staging  # noqa: E402
from bmclip.data.pmc import sources as sources_mod  # noqa: E402
from bmclip.data.pmc import upload as upload_mod  # noqa: E402
from bmclip.data.pmc.build import BuildOptions, stage  # noqa: E402
from bmclip.data.pmc.sources import InputReadError, discover_packages  # noqa: E402
from bmclip.data.pmc.upload import RemoteOutput, UploadError  # noqa: E402
from bmclip.errors import ConfigError  # noqa: E402
from bmclip.io.fs import CLOUD_HINT, parse_storage_options  # noqa: E402
from bmclip.io.retry import RetryError, backoff_delays, retry  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURE_PMC = REPO / "tests" / "fixtures" / "pmc"
AS_TARBALL = ("pone.0056489",)  # OA-package style .tar.gz (streamed); the others stay folders
OPTS = dict(shard_size=1, val_fraction=0.25, test_fraction=0.25, seed=7, chunk_size=1)
CLI_OPTS = ["--shard-size", "1", "--val-fraction", "0.25", "--test-fraction", "0.25", "--seed", "7",
            "--chunk-size", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _input_files() -> dict[str, bytes]:
    """The real PMC fixtures as an input tree: relative path -> bytes (two articles as OA package tarballs)."""
    files: dict[str, bytes] = {}
    for d in sorted(p for p in FIXTURE_PMC.iterdir() if p.is_dir()):
        members = sorted(p for p in d.rglob("*") if p.is_file())
        if d.name in AS_TARBALL:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                for p in members:
                    ti = tarfile.TarInfo(f"{d.name}/{p.relative_to(d).as_posix()}")
                    ti.size = p.stat().st_size
                    tf.addfile(ti, io.BytesIO(p.read_bytes()))
            files[f"{d.name}.tar.gz"] = gzip.compress(buf.getvalue(), mtime=0)
        else:
            for p in members:
                files[f"{d.name}/{p.relative_to(d).as_posix()}"] = p.read_bytes()
    # the PLOS article once more in the PMC Cloud per-article layout (metadata JSON, media by name): read
    # remotely too, and deduplicated against the tarball copy by its DOI
    cloud = "PMC3571234.1"
    for p in sorted((FIXTURE_PMC / "pone.0056489").iterdir()):
        name = f"{cloud}.xml" if p.suffix == ".xml" else p.name
        files[f"{cloud}/{name}"] = p.read_bytes()
    meta = {"pmcid": "PMC3571234", "version": 1, "license_code": "CC BY", "is_retracted": False}
    files[f"{cloud}/{cloud}.json"] = json.dumps(meta).encode()
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A moto S3 server on a free loopback port, the input tree in s3://pmc-in/pmc/ and on disk, a local
    reference build of it, and the one staging path every build uses (manifest.json records it)."""
    root = tmp_path_factory.mktemp("remote")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the S3 server's per-request log lines
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            endpoint = f"http://127.0.0.1:{port}"
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            files = _input_files()
            fs.mkdir("pmc-in")
            local_in = root / "in" / "pmc"
            for rel, data in files.items():
                fs.pipe_file(f"pmc-in/pmc/{rel}", data)
                (local_in / rel).parent.mkdir(parents=True, exist_ok=True)
                (local_in / rel).write_bytes(data)
            staging = root / "st"
            ref = root / "ref"
            stats = build_dataset([local_in], ref, staging=staging, num_workers=0, progress=False, **OPTS)
            yield {"endpoint": endpoint, "fs": fs, "so": {"endpoint_url": endpoint}, "local_in": local_in,
                   "staging": staging, "ref": ref, "stats": stats, "root": root}  # fmt: skip
        finally:
            server.stop()


def _objects(fs, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (recursively): name relative to it -> bytes."""
    fs.invalidate_cache()
    return {name[len(prefix) + 1 :]: fs.cat_file(name) for name in sorted(fs.find(prefix))}


def _local_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_same_build(got: dict[str, bytes], want: dict[str, bytes], stagings: list[str]) -> None:
    """``got`` has the same files as ``want`` (the local reference build), byte for byte; manifest.json only
    differs in ``stagings``, which names where the staging dirs were."""
    assert sorted(got) == sorted(want)  # no temporary, staging or extra objects
    assert {k: v for k, v in got.items() if k != "manifest.json"} == {
        k: v for k, v in want.items() if k != "manifest.json"}  # fmt: skip
    g, w = json.loads(got["manifest.json"]), json.loads(want["manifest.json"])
    assert g.pop("stagings") == stagings
    w.pop("stagings")
    assert g == w


# ------------------------------------------------------------------------------------- helpers in isolation


def test_retry_backoff_limits_and_predicates():
    assert backoff_delays(5, 0.5, 3.0) == [0.5, 1.0, 2.0, 3.0]
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, attempts=5, base_delay=0.25, max_delay=10, jitter=False, sleep=slept.append) == "ok"
    assert len(calls) == 3 and slept == [0.25, 0.5]
    slept.clear()
    retry(lambda: 1, attempts=3, sleep=slept.append)
    assert slept == []
    # after the last attempt: RetryError naming the operation, chained to the last failure; jittered delays
    # stay within 50-100 % of the exponential schedule
    def always():
        calls.append(1)
        raise ConnectionResetError("again")

    calls.clear()
    with pytest.raises(RetryError, match=r"upload of x failed after 4 attempts: ConnectionResetError: again") as ei:
        retry(always, attempts=4, base_delay=1.0, max_delay=2.5, what="upload of x", sleep=slept.append)
    assert isinstance(ei.value.__cause__, ConnectionResetError) and len(calls) == 4
    assert len(slept) == 3 and all(lo <= s <= hi for s, lo, hi in zip(slept, [0.5, 1, 1.25], [1, 2, 2.5]))

    # a failure retry_on refuses is raised at once, untouched
    def denied():
        calls.append(1)
        raise PermissionError("denied")

    calls.clear()
    with pytest.raises(PermissionError):
        retry(denied, retry_on=lambda e: not isinstance(e, PermissionError), sleep=slept.append)
    assert len(calls) == 1
    with pytest.raises(KeyError):
        retry(lambda: {}["x"], retry_on=OSError, sleep=slept.append)
    with pytest.raises(ValueError, match="attempts"):
        retry(lambda: 1, attempts=0)


def test_storage_options_and_missing_cloud_extra(tmp_path):
    assert parse_storage_options(["endpoint_url=http://h:9000", "anon=true", "client_kwargs={\"a\": 1}"]) == {
        "endpoint_url": "http://h:9000", "anon": True, "client_kwargs": {"a": 1}}  # fmt: skip
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_storage_options(["novalue"])
    # a remote staging dir is deleted after the build: a whole bucket is refused before anything is read
    with pytest.raises(ConfigError, match="must be a prefix inside a bucket"):
        build_dataset([FIXTURE_PMC], tmp_path / "o", staging="s3://bucket/", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="http\\(s\\) inputs must be package tarballs"):
        discover_packages(["https://127.0.0.1:9/some/folder/"])
    # without fsspec, or without the s3 backend: a clear error naming the extra, exit status 2 from the CLI
    code = (
        "import sys\n"
        "from bmclip.cli import main\n"
        "from bmclip.data.pmc.sources import discover_packages\n"
        "from bmclip.errors import ConfigError\n"
        "for blocked in ('fsspec', 's3fs'):\n"
        "    sys.modules[blocked] = None\n"
        "    try:\n"
        "        discover_packages(['s3://bucket/pmc/'])\n"
        "    except ConfigError as e:\n"
        "        print('ERR', blocked, e)\n"
        "    del sys.modules[blocked]\n"
        "sys.modules['s3fs'] = None\n"
        f"rc = main(['build-dataset', 's3://bucket/pmc/', '--output', {str(tmp_path / 'o')!r}, '--no-progress'])\n"
        "print('RC', rc)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines if ln.startswith("ERR")] == [["ERR", "fsspec"], ["ERR", "s3fs"]]
    assert all(CLOUD_HINT in ln for ln in lines if ln.startswith("ERR"))
    assert "RC 2" in lines and CLOUD_HINT in r.stderr
    assert not (tmp_path / "o").exists()


def test_non_atomic_store_writes_temp_name_then_renames(tmp_path, monkeypatch):
    # memory:// has no atomic PUT: the file goes to a temporary name and is renamed; a failed rename leaves
    # neither the final name nor the temporary one.
    monkeypatch.setattr(upload_mod, "UPLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(upload_mod, "UPLOAD_BASE_DELAY", 0.0)
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 3000)
    out = RemoteOutput("memory://bmclip-test-upload/out")
    mem = fsspec.filesystem("memory")
    try:
        assert not out.atomic_put
        moves = []
        real_mv = type(mem).mv

        def mv(self, a, b, **kw):
            moves.append((a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]))
            return real_mv(self, a, b, **kw)

        monkeypatch.setattr(type(mem), "mv", mv)
        assert out.put(src, remove=False) == "memory://bmclip-test-upload/out/a.bin"
        assert mem.cat_file("/bmclip-test-upload/out/a.bin") == b"x" * 3000
        assert len(moves) == 1 and moves[0][0].startswith(".a.bin.") and moves[0][0].endswith(".tmp")

        def broken_mv(self, a, b, **kw):
            raise ConnectionResetError("lost the server")

        monkeypatch.setattr(type(mem), "mv", broken_mv)
        with pytest.raises(UploadError, match=r"upload of memory://bmclip-test-upload/out/b.bin failed after 2"):
            out.put(src, "b.bin")
        assert out.names() == {"a.bin"} and src.exists()  # nothing half-done remotely; the local file is kept
    finally:
        out.close()
        mem.rm("/bmclip-test-upload", recursive=True)


# ------------------------------------------------------------------------------------- builds against S3


def test_build_s3_to_s3_equals_local_build(env, monkeypatch):
    fs, staging = env["fs"], env["staging"]
    # the s3 prefix gives the same packages (same keys) as the local copy, opened by URL
    remote_pkgs, _ = discover_packages(["s3://pmc-in/pmc/"], storage_options=env["so"])
    local_pkgs, _ = discover_packages([env["local_in"]])
    assert [(p.key, p.kind) for p in remote_pkgs] == [(p.key, p.kind) for p in local_pkgs]
    assert {p.kind for p in remote_pkgs} == {"tar", "folder", "pmc_cloud"}
    assert all(p.path.startswith("s3://pmc-in/pmc/") for p in remote_pkgs)
    # Uploads lag behind the merge (one thread, one shard in flight): the local work folder never holds more
    # than the shard just finished and the one being uploaded.
    monkeypatch.setattr(upload_mod, "UPLOAD_THREADS", 1)
    monkeypatch.setattr(upload_mod, "MAX_PENDING", 1)
    real_put = RemoteOutput._put_once
    local_tars = []

    def slow_put(self, local, name):
        local_tars.append(len(list((staging / "_upload").glob("*.tar"))))
        time.sleep(0.05)
        return real_put(self, local, name)

    monkeypatch.setattr(RemoteOutput, "_put_once", slow_put)
    fs.mkdir("pmc-out")
    rc = main(["build-dataset", "s3://pmc-in/pmc/", "--output", "s3://pmc-out/ds/", "--staging", str(staging),
               "--storage-option", f"endpoint_url={env['endpoint']}", "-j", "2", "--no-progress", *CLI_OPTS])
    assert rc == 0
    got, want = _objects(fs, "pmc-out/ds"), _local_files(env["ref"])
    assert sorted(got) == sorted(want)  # no temporary or extra objects
    assert got == want  # every shard, index, stats.json/png, sizes.json and manifest.json byte for byte
    n_tars = sum(1 for k in want if k.endswith(".tar"))
    assert n_tars == env["stats"]["pairs_total"] == 8  # shard_size 1: one shard per pair
    assert env["stats"]["skips"]["figure"]["duplicate_article"] == 3  # the PLOS article's second copy
    assert len(local_tars) == 2 * n_tars + 4 and max(local_tars) <= 2
    assert not staging.exists()


def test_upload_faults_retried_then_clear_error_and_rerun(env, monkeypatch):
    fs, staging = env["fs"], env["staging"]
    monkeypatch.setattr(upload_mod, "UPLOAD_ATTEMPTS", 3)
    monkeypatch.setattr(upload_mod, "UPLOAD_BASE_DELAY", 0.01)
    opts = BuildOptions(**OPTS)
    stage([env["local_in"]], staging, opts, num_workers=0, progress=False)
    want = _local_files(env["ref"])
    flaky, dead = "train-000001.tar", "train-000002.tar"
    assert flaky in want and dead in want
    out_fs = fsspec.core.url_to_fs("s3://pmc-faults/ds", **env["so"])[0]  # the (cached) instance merge uses
    real_put_file = out_fs.put_file
    calls: dict[str, int] = {}

    def faulty_put_file(lpath, rpath, *a, **kw):
        name = rpath.rsplit("/", 1)[-1]
        calls[name] = calls.get(name, 0) + 1
        if name == flaky and calls[name] == 1:  # a store that acknowledges a short write: caught by the size
            out_fs.pipe_file(rpath, Path(lpath).read_bytes()[:1000])  # check, then uploaded again
            return None
        if (name == flaky and calls[name] == 2) or name == dead:
            raise ConnectionResetError("connection reset by peer")
        return real_put_file(lpath, rpath, *a, **kw)

    monkeypatch.setattr(out_fs, "put_file", faulty_put_file)
    fs.mkdir("pmc-faults")
    with pytest.raises(UploadError, match=rf"upload of s3://pmc-faults/ds/{dead} failed after 3 attempts"):
        merge_staging([staging], "s3://pmc-faults/ds/", opts, progress=False, storage_options=env["so"])
    got = _objects(fs, "pmc-faults/ds")
    assert calls[dead] == 3
    assert dead not in got and "manifest.json" not in got and "sizes.json" not in got
    assert all(got[k] == want[k] for k in got)  # whatever is there is complete
    # the dead object recovers: the rerun completes, and the flaky one was retried to the full object
    calls.clear()
    dead = "none"
    merge_staging([staging], "s3://pmc-faults/ds/", opts, progress=False, storage_options=env["so"])
    assert calls[flaky] == 3 and all(n == 1 for k, n in calls.items() if k != flaky)
    assert _objects(fs, "pmc-faults/ds") == want
    assert not (staging / "_upload").exists()
    shutil.rmtree(staging)


def test_remote_read_faults_retried_or_stop_the_stage(env, monkeypatch):
    # Reads of remote packages that fail are retried; a package that cannot be read is never recorded as
    # skipped: the stage stops (InputReadError) and a rerun stages it.
    monkeypatch.setattr(sources_mod, "READ_ATTEMPTS", 2)
    monkeypatch.setattr(sources_mod, "READ_BASE_DELAY", 0.0)
    root = env["root"]
    opts = BuildOptions(**OPTS)
    local_st, remote_st = root / "st-local", root / "st-remote"
    stage([env["local_in"]], local_st, opts, num_workers=0, progress=False)
    real_read = AbstractBufferedFile.read
    failures = {"left": 0, "always": False}

    def dropping_read(self, length=-1):
        if "pone.0056489.tar.gz" in self.path and self.loc > 0:
            if failures["always"]:
                raise ConnectionResetError("connection dropped mid-package")
            if failures["left"] > 0:
                failures["left"] -= 1
                raise ConnectionResetError("connection dropped mid-package")
        return real_read(self, length)

    monkeypatch.setattr(AbstractBufferedFile, "read", dropping_read)
    # a folder image that cannot be fetched stops the stage too (not an internal_error skip)
    in_fs = fsspec.core.url_to_fs("s3://pmc-in/pmc/", **env["so"])[0]  # the (cached) instance the stage uses
    real_cat = in_fs.cat_file

    def failing_cat(path, *a, **kw):
        if path.endswith((".tif", ".jpg")):
            raise ConnectionResetError("connection dropped")
        return real_cat(path, *a, **kw)

    monkeypatch.setattr(in_fs, "cat_file", failing_cat)
    with pytest.raises(InputReadError, match=r"reading s3://pmc-in/pmc/[^ ]+\.(tif|jpg) failed after 2 attempts"):
        stage(["s3://pmc-in/pmc/"], remote_st, opts, num_workers=0, progress=False, storage_options=env["so"])
    assert not (remote_st / "complete.json").exists()
    keys = [p.key for p in discover_packages([env["local_in"]])[0]]
    assert f"chunk-{keys.index('pmc/elife-32671'):06d}.bin" not in {p.name for p in (remote_st / "chunks").iterdir()}
    monkeypatch.setattr(in_fs, "cat_file", real_cat)
    failures["always"] = True
    with pytest.raises(InputReadError, match=r"reading s3://pmc-in/pmc/pone.0056489.tar.gz failed after 2 attempts"):
        stage(["s3://pmc-in/pmc/"], remote_st, opts, num_workers=0, progress=False, storage_options=env["so"])
    assert not (remote_st / "complete.json").exists()
    done = sorted(p.name for p in (remote_st / "chunks").iterdir())
    assert f"chunk-{keys.index('pmc/pone.0056489.tar.gz'):06d}.bin" not in done
    assert f"chunk-{keys.index('pmc/elife-32671'):06d}.bin" in done
    failures["always"] = False
    failures["left"] = 1
    # one dropped connection: retried; the rerun finishes and stages exactly what the local stage did
    stage(["s3://pmc-in/pmc/"], remote_st, opts, num_workers=0, progress=False, storage_options=env["so"])
    assert failures["left"] == 0
    assert _local_files(remote_st / "chunks") == _local_files(local_st / "chunks")
    assert json.loads((remote_st / "complete.json").read_text()) == json.loads((local_st / "complete.json").read_text())


def test_build_from_http_and_file_urls_equals_local(env, tmp_path):
    # an http(s) input is one package tarball, streamed from a plain HTTP server (no Range support needed)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(env["local_in"]))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/pone.0056489.tar.gz"
        kw = dict(num_workers=0, progress=False, val_fraction=0, test_fraction=0)
        a = build_dataset([url], tmp_path / "a", **kw)
        with pytest.raises(ConfigError, match="does not exist"):
            build_dataset([url.replace("pone", "nope")], tmp_path / "c", **kw)
    finally:
        server.shutdown()
        server.server_close()
    b = build_dataset([env["local_in"] / "pone.0056489.tar.gz"], tmp_path / "b", **kw)
    # file:// URLs are local paths (written in place, atomically)
    c = build_dataset([(env["local_in"] / "pone.0056489.tar.gz").as_uri()], (tmp_path / "c d").as_uri(), **kw)
    assert a["pairs"] == b["pairs"] == c["pairs"] == {"train": 3, "val": 0, "test": 0}
    shards = {k: v for k, v in _local_files(tmp_path / "a").items() if k.endswith((".tar", ".idx", "sizes.json"))}
    assert len(shards) == 3
    for other in ("b", "c d"):
        assert shards == {k: v for k, v in _local_files(tmp_path / other).items() if k in shards}


@pytest.mark.slow
def test_kill_during_upload_and_rerun_gives_identical_objects(env):
    # A builder killed while it uploads shards leaves only complete objects (or none) and no manifest; the
    # same command rerun produces the same objects as the local build. The endpoint comes from the standard
    # AWS_ENDPOINT_URL variable here (no storage option).
    fs, staging = env["fs"], env["staging"]
    fs.mkdir("pmc-kill")
    want = _local_files(env["ref"])
    argv = ["build-dataset", "s3://pmc-in/pmc/", "--output", "s3://pmc-kill/ds", "--staging", str(staging),
            "-j", "0", "--no-progress", *CLI_OPTS]  # fmt: skip
    proc = _slowed_builder(argv, "", env["endpoint"])  # every upload slowed ("" ends every name)
    _kill_when(proc, lambda: _count(fs, "pmc-kill/ds", ".tar") >= 2)  # names only: objects may go while it looks
    at_kill = _objects(fs, "pmc-kill/ds")
    assert 2 <= sum(k.endswith(".tar") for k in at_kill) < 8
    assert "manifest.json" not in at_kill and "sizes.json" not in at_kill
    assert all(at_kill[k] == want[k] for k in at_kill)  # no partial object under a final name
    assert (staging / "complete.json").exists()  # the stage finished before the kill: the rerun resumes it
    assert main([*argv, "--storage-option", f"endpoint_url={env['endpoint']}"]) == 0
    assert _objects(fs, "pmc-kill/ds") == want
    assert not staging.exists()


# ------------------------------------------------------------------------------------- remote staging dirs


def _disk_use(folder: Path) -> tuple[list[str], int]:
    """(file names, total bytes) under ``folder`` now, including this process's open files there that are
    already unlinked (the shard writer's spool files); files that vanish while it looks are left out."""
    names, total = [], 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
                names.append(p.name)
        except FileNotFoundError:
            pass
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(f"{folder}/") and target.endswith(" (deleted)"):
                total += os.stat(fd).st_size
                names.append(Path(target.removesuffix(" (deleted)")).name)
        except OSError:
            pass
    return names, total


def _local_stage(env, tmp_path: Path) -> dict[str, bytes]:
    """The chunk files of a local stage of the local inputs: what a remote staging dir must hold."""
    st = tmp_path / "st-ref"
    stage([env["local_in"]], st, BuildOptions(**OPTS), num_workers=0, progress=False)
    return _local_files(st / "chunks")


def test_staging_on_non_atomic_store_resumes_and_equals_local(env, tmp_path, monkeypatch):
    # memory:// has no atomic PUT: staging files go to a temporary name and are renamed. A rerun deletes the
    # temporary objects a killed write left and redoes only the chunks that do not exist.
    mem = fsspec.filesystem("memory")
    url = "memory://bmclip-test-staging/run/st"
    real_put = RemoteOutput._put_once
    puts: list[str] = []
    moves: list[tuple[str, str]] = []
    real_mv = type(mem).mv

    def put(self, local, name):
        puts.append(name)
        assert isinstance(local, bytes)  # written from memory, never from a local file
        return real_put(self, local, name)

    def mv(self, a, b, **kw):
        moves.append((a.rsplit("/", 1)[-1], b.rsplit("/", 1)[-1]))
        return real_mv(self, a, b, **kw)

    monkeypatch.setattr(RemoteOutput, "_put_once", put)
    monkeypatch.setattr(type(mem), "mv", mv)
    try:
        opts = BuildOptions(**OPTS)
        stage([env["local_in"]], url, opts, num_workers=0, progress=False)
        n = len(discover_packages([env["local_in"]])[0])
        assert puts == ["plan.json", *[f"chunks/chunk-{i:06d}.bin" for i in range(n)], "complete.json"]
        assert all(a.startswith(f".{b}.") and a.endswith(".tmp") for a, b in moves) and len(moves) == len(puts)
        root = "/bmclip-test-staging/run/st"
        staged = _objects(mem, root)
        assert {k.removeprefix("chunks/"): v for k, v in staged.items() if k.startswith("chunks/")} == (
            _local_stage(env, tmp_path))
        # a killed run: one chunk and complete.json missing, temporary objects of interrupted writes left
        mem.rm(f"{root}/chunks/chunk-000003.bin")
        mem.rm(f"{root}/complete.json")
        mem.pipe_file(f"{root}/chunks/.chunk-000003.bin.0badf00d.tmp", b"half a chunk")
        mem.pipe_file(f"{root}/.complete.json.12345678.tmp", b"{")
        puts.clear()
        summary = stage([env["local_in"]], url + "/", opts, num_workers=0, progress=False)
        assert puts == ["chunks/chunk-000003.bin", "complete.json"]
        assert summary["chunks_resumed"] == n - 1
        assert _objects(mem, root) == staged
        # a rerun with other stage options is refused, as for a local staging dir
        with pytest.raises(ConfigError, match=r"made by a different run \(differs in: options\)"):
            stage([env["local_in"]], url, BuildOptions(**OPTS, max_side=256), num_workers=0, progress=False)
        # the merge reads the staging prefix; the build equals the local reference
        merge_staging([url], tmp_path / "out", opts, progress=False)
        _assert_same_build(_local_files(tmp_path / "out"), _local_files(env["ref"]), [url])
        # worker processes would write chunks that the parent never sees: refused
        with pytest.raises(ConfigError, match="memory:// staging dir is only seen by the process"):
            stage([env["local_in"]], url + "2", opts, num_workers=2, progress=False)
    finally:
        if mem.exists("/bmclip-test-staging"):
            mem.rm("/bmclip-test-staging", recursive=True)


def test_s3_to_s3_with_remote_staging_equals_local_build_and_bounds_local_disk(env, tmp_path, monkeypatch):
    # No --staging with a remote output: staging goes to OUTPUT/_staging. Chunks are uploaded from memory,
    # the merge reads them back one at a time, and the only local disk the build uses is its temporary work
    # folder, which never holds more than a few shards.
    fs = env["fs"]
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    monkeypatch.setattr(upload_mod, "UPLOAD_THREADS", 1)
    monkeypatch.setattr(upload_mod, "MAX_PENDING", 1)
    real_put = RemoteOutput._put_once
    at_put: list[tuple[str, bool, int, int]] = []  # object URL, from memory, local tars, local bytes
    staged_at_complete: list[str] = []

    def put(self, local, name):
        names, used = _disk_use(work)
        at_put.append((self.url_of(name), isinstance(local, bytes), sum(n.endswith(".tar") for n in names), used))
        if name == "complete.json":
            staged_at_complete.extend(sorted(self.names("chunks")))
        time.sleep(0.02)
        return real_put(self, local, name)

    monkeypatch.setattr(RemoteOutput, "_put_once", put)
    peak = {"bytes": 0, "names": set()}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            names, used = _disk_use(work)
            peak["bytes"] = max(peak["bytes"], used)
            peak["names"].update(names)
            time.sleep(0.002)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    fs.mkdir("pmc-rst")
    try:
        rc = main(["build-dataset", "s3://pmc-in/pmc/", "--output", "s3://pmc-rst/ds/", "--storage-option",
                   f"endpoint_url={env['endpoint']}", "-j", "0", "--no-progress", *CLI_OPTS])  # fmt: skip
    finally:
        stop.set()
        poller.join()
    assert rc == 0
    want = _local_files(env["ref"])
    _assert_same_build(_objects(fs, "pmc-rst/ds"), want, ["s3://pmc-rst/ds/_staging"])  # staging removed
    n = len(discover_packages([env["local_in"]])[0])
    assert staged_at_complete == [f"chunk-{i:06d}.bin" for i in range(n)]
    stage_puts = [p for p in at_put if p[0].startswith("s3://pmc-rst/ds/_staging/")]
    shard_puts = [p for p in at_put if p[0].endswith((".tar", ".idx"))]
    final_puts = [p for p in at_put if p[0].rsplit("/", 1)[-1] in ("stats.json", "stats.png", "sizes.json",
                                                                  "manifest.json")]
    assert len(stage_puts) == n + 2 and len(shard_puts) == 16 and len(final_puts) == 4
    assert all(from_memory and used == 0 for _n, from_memory, _t, used in stage_puts)  # no local disk at all
    shard = max(len(want[k]) + len(want[k[:-4] + ".idx"]) for k in want if k.endswith(".tar"))
    finals = sum(len(want[k]) for k in ("stats.json", "stats.png", "sizes.json", "manifest.json"))
    assert max(t for _n, _m, t, _u in shard_puts) <= 2
    assert max(u for _n, _m, _t, u in shard_puts) <= 3 * shard
    assert max(u for _n, _m, _t, u in final_puts) <= finals
    assert peak["bytes"] <= max(3 * shard, finals)
    assert not any(name.endswith(".bin") for name in peak["names"])  # no staging chunk ever on local disk
    staged_total = sum(len(v) for v in _local_stage(env, tmp_path).values())
    assert staged_total > max(3 * shard, finals)  # a local staging copy could not have met the bound
    assert list(work.iterdir()) == []


def test_slices_staged_remotely_then_merged(env, tmp_path, monkeypatch):
    # Two slices staged into remote staging dirs (the stage-only form), then one merge of both into a remote
    # output and one into a local folder: both equal the local build; merging leaves the staging dirs.
    # Every chunk's first write and first read fail (connection reset): retried.
    monkeypatch.setattr(upload_mod, "UPLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(upload_mod, "UPLOAD_BASE_DELAY", 0.0)
    fs, so = env["fs"], [f"endpoint_url={env['endpoint']}"]
    st_fs = fsspec.core.url_to_fs("s3://pmc-sl/run", **env["so"])[0]  # the (cached) instance staging uses
    real_pipe, real_cat = st_fs.pipe_file, st_fs.cat_file
    calls: dict[tuple[str, str], int] = {}

    def flaky(op, real):
        def call(path, *a, **kw):
            if path.endswith(".bin"):
                calls[op, path] = calls.get((op, path), 0) + 1
                if calls[op, path] == 1:
                    raise ConnectionResetError("connection reset by peer")
            return real(path, *a, **kw)

        return call

    monkeypatch.setattr(st_fs, "pipe_file", flaky("put", real_pipe))
    monkeypatch.setattr(st_fs, "cat_file", flaky("get", real_cat))
    fs.mkdir("pmc-sl")
    stagings = [f"s3://pmc-sl/run/st{k}" for k in range(2)]
    for k, st in enumerate(stagings):
        assert main(["build-dataset", "s3://pmc-in/pmc/", "--staging", st, "--num-slices", "2", "--slice", str(k),
                     "--storage-option", *so, "-j", "0", "--no-progress", *CLI_OPTS]) == 0  # fmt: skip
    chunk_counts = [len(fs.ls(f"pmc-sl/run/st{k}/chunks")) for k in range(2)]
    n = len(discover_packages([env["local_in"]])[0])
    assert all(c > 0 for c in chunk_counts) and sum(chunk_counts) == n
    assert main(["build-dataset", "merge", *stagings, "--output", "s3://pmc-sl/ds", "--storage-option", *so,
                 "--no-progress", *CLI_OPTS]) == 0  # fmt: skip
    assert sorted(calls.values()) == [2] * (2 * n)  # each chunk: one failed and one good PUT and GET
    want = _local_files(env["ref"])
    _assert_same_build(_objects(fs, "pmc-sl/ds"), want, stagings)
    monkeypatch.setattr(st_fs, "cat_file", real_cat)
    merge_staging(stagings, tmp_path / "local", BuildOptions(**OPTS), progress=False, storage_options=env["so"])
    _assert_same_build(_local_files(tmp_path / "local"), want, stagings)
    assert all(fs.exists(f"pmc-sl/run/st{k}/complete.json") for k in range(2))
    # a chunk that cannot be read stops the merge with an error naming it
    def dead(path, *a, **kw):
        if path.endswith("chunk-000000.bin"):
            raise ConnectionResetError("connection reset by peer")
        return real_cat(path, *a, **kw)

    monkeypatch.setattr(st_fs, "cat_file", dead)
    with pytest.raises(UploadError, match=r"reading s3://pmc-sl/run/st\d/chunks/chunk-000000.bin failed after 2"):
        merge_staging(stagings, tmp_path / "l2", BuildOptions(**OPTS), progress=False, storage_options=env["so"])


def _count(fs, prefix: str, suffix: str) -> int:
    """How many objects under ``prefix`` end with ``suffix`` (0 while there is none)."""
    fs.invalidate_cache()
    try:
        return sum(p.endswith(suffix) for p in fs.find(prefix))
    except FileNotFoundError:
        return 0


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the process group of ``proc`` once ``ready()`` is true (fails if it ended before)."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "builder finished (or failed) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _slowed_builder(argv: list[str], slow_suffix: str, endpoint: str, tmpdir: Path | None = None) -> subprocess.Popen:
    """``bmclip build-dataset ARGV`` in a subprocess whose uploads of objects ending in ``slow_suffix`` take
    0.4 s longer (so that a kill lands in the middle of them)."""
    code = (
        "import sys, time\n"
        "from bmclip.cli import main\n"
        "from bmclip.data.pmc.upload import RemoteOutput\n"
        "real = RemoteOutput._put_once\n"
        "def slow(self, local, name):\n"
        f"    if name.endswith({slow_suffix!r}):\n"
        "        time.sleep(0.4)\n"
        "    return real(self, local, name)\n"
        "RemoteOutput._put_once = slow\n"
        f"sys.exit(main({argv!r}))\n"
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env=env)


def test_kill_during_remote_stage_then_rerun_gives_identical_objects(env, tmp_path, monkeypatch):
    # Killed while its worker processes upload staging chunks: the staging prefix holds complete chunks only
    # and no complete.json; the rerun stages only the missing chunks and the output equals the local build.
    fs = env["fs"]
    fs.mkdir("pmc-kst")
    argv = ["build-dataset", "s3://pmc-in/pmc/", "--output", "s3://pmc-kst/ds", "--no-progress", *CLI_OPTS]
    proc = _slowed_builder([*argv, "-j", "2"], ".bin", env["endpoint"])
    _kill_when(proc, lambda: _count(fs, "pmc-kst/ds/_staging/chunks", ".bin") >= 2)
    ref_chunks = _local_stage(env, tmp_path)
    at_kill = _objects(fs, "pmc-kst/ds")
    chunks = {k.removeprefix("_staging/chunks/"): v for k, v in at_kill.items() if k.startswith("_staging/chunks/")}
    assert 2 <= len(chunks) < len(ref_chunks)
    assert all(chunks[k] == ref_chunks[k] for k in chunks)  # every chunk object is complete
    assert set(at_kill) == {"_staging/plan.json", *(f"_staging/chunks/{k}" for k in chunks)}
    real_put = RemoteOutput._put_once
    puts: list[str] = []

    def put(self, local, name):
        puts.append(name)
        return real_put(self, local, name)

    monkeypatch.setattr(RemoteOutput, "_put_once", put)
    assert main([*argv, "-j", "0", "--storage-option", f"endpoint_url={env['endpoint']}"]) == 0
    assert sorted(p.removeprefix("chunks/") for p in puts if p.endswith(".bin")) == sorted(
        set(ref_chunks) - set(chunks))  # fmt: skip
    _assert_same_build(_objects(fs, "pmc-kst/ds"), _local_files(env["ref"]), ["s3://pmc-kst/ds/_staging"])


def test_kill_during_merge_from_remote_staging_then_rerun_gives_identical_objects(env, tmp_path, monkeypatch):
    # Killed while the merge (reading a remote staging dir given with --staging) uploads shards: only complete
    # objects, no manifest; the rerun clears the killed merge's work folder, redoes the merge and removes the
    # staging prefix; the objects equal the local build.
    fs = env["fs"]
    fs.mkdir("pmc-kmg")
    work = tmp_path / "tmp"
    work.mkdir()
    staging = "s3://pmc-kmg/run/_staging"
    argv = ["build-dataset", "s3://pmc-in/pmc/", "--output", "s3://pmc-kmg/ds", "--staging", staging,
            "-j", "0", "--no-progress", *CLI_OPTS]  # fmt: skip
    proc = _slowed_builder(argv, ".tar", env["endpoint"], work)
    _kill_when(proc, lambda: _count(fs, "pmc-kmg/ds", ".tar") >= 2)
    want = _local_files(env["ref"])
    at_kill = _objects(fs, "pmc-kmg/ds")
    assert 2 <= sum(k.endswith(".tar") for k in at_kill) < 8
    assert "manifest.json" not in at_kill and "sizes.json" not in at_kill
    assert all(at_kill[k] == want[k] for k in at_kill)  # no partial object under a final name
    assert fs.exists("pmc-kmg/run/_staging/complete.json")  # the stage had finished: the rerun resumes it
    left = sorted(p.name for p in work.iterdir())  # the killed merge's work folder and its lock file
    assert len(left) == 2 and left[0].startswith("bmclip-merge-") and left[1] == left[0] + ".lock", left
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    assert main([*argv, "--storage-option", f"endpoint_url={env['endpoint']}"]) == 0
    _assert_same_build(_objects(fs, "pmc-kmg/ds"), want, [staging])
    assert not fs.exists("pmc-kmg/run/_staging") and fs.find("pmc-kmg/run") == []
    assert list(work.iterdir()) == []
