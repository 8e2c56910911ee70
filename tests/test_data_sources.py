"""The synthetic batch source: rank split of the global batch and exact resume."""

import torch

from bmclip.data.sources import SyntheticSource


def _src(rank=0, world=1, size=40):
    return SyntheticSource(size=size, global_batch=8, image_size=16, context_length=12, seed=3, rank=rank,
                           world_size=world)


def test_synthetic_ranks_partition_the_global_batch_and_resume_exactly():
    full = _src()
    r0, r1 = _src(0, 2), _src(1, 2)
    for _ in range(7):  # crosses an epoch boundary (40 // 8 = 5 batches per epoch)
        b, b0, b1 = next(full), next(r0), next(r1)
        assert torch.equal(torch.cat([b0["image"], b1["image"]]), b["image"])
        assert torch.equal(torch.cat([b0["input_ids"], b1["input_ids"]]), b["input_ids"])
    assert full.epoch == 1
    st = full.state_dict()
    nxt = [next(full) for _ in range(3)]
    again = _src()
    again.load_state_dict(st)
    for want in nxt:
        got = next(again)
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["input_ids"], want["input_ids"])
    # captions are [CLS] a b c [SEP] then padding
    ids = nxt[0]["input_ids"]
    assert (ids[:, 0] == 2).all() and (ids[:, 4] == 3).all() and (ids[:, 5:] == 0).all()


def test_synthetic_batch_interrupted_while_built_is_not_skipped(monkeypatch):
    # The trainer stops a run by raising inside the wait for the next batch (a signal): the saved position must
    # still point at that batch, or the resumed run skips it and is no longer bitwise equal to an unbroken one.
    import bmclip.data.sources as S

    ref = _src()
    want = [next(ref) for _ in range(6)]  # crosses the epoch boundary at batch 5
    src = _src()
    for i in range(6):
        real = S.synthetic_images

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(S, "synthetic_images", interrupted)
        before = src.state_dict()
        try:
            next(src)
        except KeyboardInterrupt:
            pass
        assert src.state_dict() == before
        monkeypatch.setattr(S, "synthetic_images", real)
        got = next(src)
        assert torch.equal(got["image"], want[i]["image"]) and torch.equal(got["input_ids"], want[i]["input_ids"])
