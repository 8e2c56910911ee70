"""Evaluation: cross-modal retrieval, zero-shot and linear-probe classification, VQA, dataset readers.

The functions are importable lazily from here (``from bmclip.eval import retrieval_metrics``) so that
``import bmclip.eval`` does not pull torch; the submodules are:

- ``retrieval``: ``retrieval_metrics(image_emb, text_emb, ks, block)`` (also used by training validation),
  ``evaluate_retrieval`` (embed shards to disk, then score);
- ``zeroshot``: ``zeroshot_classify``, ``classification_metrics``, ``auroc``, ``save_confusion_png``;
- ``linear_probe``: ``linear_probe``, ``fit_logistic_regression``;
- ``vqa``: VQA-RAD / SLAKE readers, co-attention fusion model, ``train_vqa``;
- ``readers``: ImageFolder, CSV/TSV, PCam HDF5, DICOM, shard readers; ``open_dataset(spec, data_root)``;
- ``prompts``: BiomedCLIP's built-in zero-shot task specs and custom YAML tasks;
- ``embed``: batched image/text embedding, streamed ``.npy`` writer; ``report``: JSON + markdown output;
- ``models``: ``load_model(spec)`` for checkpoints, open_clip folders and presets.
"""

from __future__ import annotations

_LAZY = {
    "retrieval_metrics": "bmclip.eval.retrieval",
    "evaluate_retrieval": "bmclip.eval.retrieval",
    "zeroshot_classify": "bmclip.eval.zeroshot",
    "classification_metrics": "bmclip.eval.zeroshot",
    "auroc": "bmclip.eval.zeroshot",
    "linear_probe": "bmclip.eval.linear_probe",
    "train_vqa": "bmclip.eval.vqa",
    "load_vqa_splits": "bmclip.eval.vqa",
    "open_dataset": "bmclip.eval.readers",
    "get_task": "bmclip.eval.prompts",
    "load_model": "bmclip.eval.models",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bmclip.eval' has no attribute {name!r}")
