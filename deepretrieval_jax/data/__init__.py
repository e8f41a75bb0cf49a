"""Task datasets: definitions, prompts, converters, TFDS storage and iterators.

tasks.py         TaskSpec per family/dataset/variant and the registry (`get_task(name)`).
prompts.py       the original instruction texts, as data.
render.py        chat-template rendering, prompt-length policy, "original query" baseline.
records.py       the common `Example` record.
converters.py    DeepRetrieval's formats (raw jsonl, verl parquet, DPR, BEIR, BIRD/Spider).
tfds_builder.py  TFDS builder writing array_record; `load_split` reads it without TF.
pipeline.py      grain iterators: per-host shards, per-epoch shuffle, resumable state.
download.py      sha256-checked, cached, resumable downloads; `beir_dataset_dir`.
build.py         CLI: original files -> TFDS dataset.
"""
