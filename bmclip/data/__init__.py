"""Data: webdataset shard loading (C++ decoder), batch sources for the trainer, and the PMC dataset builder.

Import the submodules directly; this package imports none of them, so that ``bmclip.data.pmc`` (the
dataset builder: stdlib, numpy and PIL) and ``bmclip.data.images`` start without torch.

- ``bmclip.data.loader.ShardLoader``: tar shards -> batches of uint8 images + captions (the façade over
  ``bmclip.data.cursor`` (position, state, sample reading) and ``bmclip.data.producer`` (thread, ring, decode)).
- ``bmclip.data.sources``: the trainer's batch sources (``ShardSource``, ``DaliShardSource``, ``SyntheticSource``).
- ``bmclip.data.normalize.normalize_images``: uint8 NHWC -> normalised float NCHW on a device.
- ``bmclip.data.images``: image mean/std and the image extensions; ``bmclip.data.shards``: shard patterns.
- ``bmclip.data.dali``: the optional NVIDIA DALI decode/augment pipelines; ``bmclip.data.pmc``: the builder.
"""
