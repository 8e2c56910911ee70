"""Evaluation: cross-modal retrieval, zero-shot and linear-probe classification, VQA, dataset readers.

Import from the submodules (``from bmclip.eval.retrieval import retrieval_metrics``):

- ``retrieval``: ``retrieval_metrics(image_emb, text_emb, ks, block)`` (also used by training validation),
  ``evaluate_retrieval`` (embed shards to disk, then score);
- ``zeroshot``: ``zeroshot_classify``, ``classification_metrics``, ``auroc``, ``save_confusion_png``;
- ``linear_probe``: ``linear_probe``, ``fit_logistic_regression``;
- ``vqa``: VQA-RAD / SLAKE readers, co-attention fusion model, ``train_vqa``, ``load_vqa_splits``;
- ``datasets``: ImageFolder, CSV/TSV, PCam HDF5, DICOM, shard datasets; ``open_dataset(spec, data_root)``
  and its registry of built-in layouts and path formats;
- ``images``: image and DICOM decoding (files and shard members);
- ``batching``: uint8 image batches of a dataset (``iterate_batches``) or of shards (``iter_shard_pairs``);
- ``prompts``: BiomedCLIP's built-in zero-shot task specs (``get_task``) and custom YAML tasks;
- ``embed``: batched image/text embedding, streamed ``.npy`` writer; ``report``: JSON + markdown output;
- ``models``: ``load_model(spec)`` for checkpoints, open_clip folders and presets.
"""
