"""bmclip.io.atomic: a write either lands whole or leaves the old file as it was."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from bmclip.io import Crc32, atomic_torch_save, atomic_write_bytes, atomic_write_text, atomic_writer


def test_writes_land_whole(tmp_path):
    assert atomic_write_bytes(b"abc", tmp_path / "sub" / "a.bin") == 3
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"abc"
    atomic_write_text("héllo", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    n = atomic_torch_save({"w": torch.arange(5)}, tmp_path / "m.pt")
    assert n == (tmp_path / "m.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "sub", "t.txt"]


def test_crc_of_the_bytes_written_is_the_crc_of_the_file(tmp_path):
    """``crc=`` gives the CRC32 of exactly the bytes that land in the file (zlib over the file is the reference),
    for torch.save's zip writer (many tensors, several dtypes, a view of a larger storage) and plain bytes."""
    import zlib

    from bmclip.io.model_file import save_model_file

    big = torch.randn(300, 257)
    obj = {"a": torch.arange(1000, dtype=torch.int64), "b": big[7:90, 3:200], "c": torch.randn(64).bfloat16(),
           "d": [torch.ones(3, dtype=torch.float16), {"e": torch.zeros(0)}], "f": "text"}
    crc = Crc32()
    atomic_torch_save(obj, tmp_path / "o.pt", crc=crc)
    assert crc.value == zlib.crc32((tmp_path / "o.pt").read_bytes())
    crc = Crc32()
    atomic_write_bytes(b"x" * 100_003, tmp_path / "b.bin", crc=crc)
    assert crc.value == zlib.crc32(b"x" * 100_003)
    for name in ("m.pt", "m.safetensors"):
        crc = Crc32()
        save_model_file({"w": big}, {"preset": "x"}, tmp_path / name, crc=crc)
        assert crc.value == zlib.crc32((tmp_path / name).read_bytes()), name
    with pytest.raises(ValueError, match="crc= needs mode 'wb'"), atomic_writer(tmp_path / "t.txt", "w", crc=Crc32()):
        pass


def test_an_interrupt_inside_torch_save_stays_an_interrupt(tmp_path):
    """Ctrl-C (or SIGTERM, which bmclip's CLI raises as a KeyboardInterrupt) during torch.save: torch's zip writer
    fails while unwinding ("unexpected pos N vs M") and that RuntimeError used to replace the interrupt, so the
    command died with a traceback and exit 1 instead of stopping as interrupted. The interrupt comes back out; no
    file or temp file is left."""

    class InterruptAtFifthWrite(Crc32):  # the interrupt arrives while torch.save writes, as a signal would
        def __init__(self):
            super().__init__()
            self.writes = 0

        def update(self, data):
            self.writes += 1
            if self.writes == 5:
                raise KeyboardInterrupt
            super().update(data)

    obj = {f"w{i}": torch.randn(100, 100) for i in range(20)}
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save(obj, tmp_path / "x.pt", crc=InterruptAtFifthWrite())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):  # other failures inside torch.save are still themselves
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "y.pt", crc=type("Bad", (Crc32,), {
            "update": lambda self, data: (_ for _ in ()).throw(RuntimeError("disk says no"))})())
    assert list(tmp_path.iterdir()) == []


def test_durable_writes_fsync_and_throwaway_ones_do_not(tmp_path, monkeypatch):
    """The default fsyncs the file and its folder; ``durable=False`` (the download cache) skips both and is still
    atomic: the target appears whole or not at all."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    with atomic_writer(tmp_path / "d.bin") as f:
        f.write(b"x" * 10)
    assert len(synced) == 2  # the file, then the folder
    synced.clear()
    with atomic_writer(tmp_path / "t.bin", durable=False) as f:
        f.write(b"y" * 10)
        assert not (tmp_path / "t.bin").exists()  # not there until complete
    assert synced == [] and (tmp_path / "t.bin").read_bytes() == b"y" * 10
    with pytest.raises(OSError), atomic_writer(tmp_path / "t.bin", durable=False) as f:
        f.write(b"half")
        raise OSError("connection dropped")
    assert (tmp_path / "t.bin").read_bytes() == b"y" * 10 and sorted(os.listdir(tmp_path)) == ["d.bin", "t.bin"]


def test_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyError), atomic_writer(target, "w") as f:
        f.write("new, half")
        raise KeyError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(ValueError, match="mode"), atomic_writer(target, "ab"):
        pass


def test_killed_writer_leaves_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    code = textwrap.dedent(f"""
        import sys, time
        from bmclip.io import atomic_writer
        with atomic_writer({str(target)!r}) as f:
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert target.read_bytes() == b"old"
    leftovers = [n for n in os.listdir(tmp_path) if n != "a.bin"]
    assert all(n.startswith(".a.bin.") and n.endswith(".tmp") for n in leftovers)


def test_written_files_get_the_permissions_open_gives(tmp_path):
    # mkstemp creates 0600 files: a checkpoint written that way would be unreadable by the rest of a group.
    old = os.umask(0o027)
    try:
        atomic_write_text("x", tmp_path / "a.txt")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640


def _finished(folder, name, text):
    # a kept temp file, as a writer of a set leaves it before the commit
    p = folder / f".{name}.ready"
    p.write_text(text)
    return p


def test_replace_as_set_lands_the_marker_last_and_removes_the_old_set(tmp_path, monkeypatch):
    from bmclip.io.atomic import replace_as_set

    (tmp_path / "sub").mkdir()
    for name, text in (("a.txt", "old a"), ("stale.csv", "old"), ("set.json", "old")):
        (tmp_path / name).write_text(text)
    order = []
    real = os.replace

    def spy(src, dst):
        order.append(os.path.basename(dst))
        return real(src, dst)

    moves = [(_finished(tmp_path, "set.json", "new"), tmp_path / "set.json"),
             (_finished(tmp_path, "a.txt", "new a"), tmp_path / "a.txt"),
             (_finished(tmp_path / "sub", "b.txt", "new b"), tmp_path / "sub" / "b.txt")]
    monkeypatch.setattr(os, "replace", spy)
    replace_as_set(moves, marker=tmp_path / "set.json", remove=[tmp_path / "stale.csv", tmp_path / "gone"])
    monkeypatch.undo()
    assert order[-1] == "set.json" and sorted(order[:-1]) == ["a.txt", "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "set.json", "sub"]
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "set.json").read_text() == "new"


def test_replace_as_set_stopped_midway_leaves_no_marker_and_names_the_target(tmp_path, monkeypatch):
    from bmclip.io.atomic import replace_as_set

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "set.json").write_text("old")
    real = os.replace

    def fail_on_b(src, dst):
        if str(dst).endswith("b.txt"):
            raise OSError(28, "No space left on device", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_b)
    moves = [(_finished(tmp_path, "set.json", "new"), tmp_path / "set.json"),
             (_finished(tmp_path, "a.txt", "new a"), tmp_path / "a.txt"),
             (_finished(tmp_path, "b.txt", "new b"), tmp_path / "b.txt")]
    with pytest.raises(OSError) as e:
        replace_as_set(moves, marker=tmp_path / "set.json")
    assert e.value.filename == str(tmp_path / "b.txt")  # the target, not the hidden temp name
    assert not (tmp_path / "set.json").exists()  # old marker gone, new one never landed: the set is visibly incomplete
