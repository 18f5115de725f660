"""The transfer set as kdcache reads it, in both stages.

- :mod:`.items`    dataset items split into inputs and label, fetched a batch at a time
- :mod:`.digests`  a 64-bit digest of each row's input: stage two checks it is what the teacher saw
- :mod:`.views`    K seeded augmentation views per sample, replayed bit for bit
- :mod:`.hf`       ``hf-disk:``/``parquet:``/``jsonl:`` datasets, text tokenized (the ``hf`` extra)
"""
