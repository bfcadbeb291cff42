"""The data stage: corpora -> tokens -> proxy-scored, filtered positions -> ArrayRecord -> batches.

    sources.py    documents from text/JSONL/Parquet files, local TFDS data, or the synthetic corpus
    synthetic.py  the built-in deterministic maths corpus
    filtering.py  on-device top-k entropy scoring with a proxy model; position filters; buckets
    records.py    the position record format and ArrayRecord shards
    prepare.py    `prepare(config, tokenizer, proxy_model, out_dir)`: the offline stage end to end
    pipeline.py   the Grain loader of prompt batches for training and evaluation
"""
