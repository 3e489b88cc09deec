"""Training data: read files, tokenize with the chat template and loss masks, pack into rows.

read_records(path)        -> [(record, "file:line")]        readers.py
to_sample / load_samples  -> Sample(input_ids, labels)      tokenize.py
task_samples              -> built-in tasks as chat samples  tokenize.py
pack(samples, max_len)    -> PackedRows (+ PackStats)        packing.py
"""

from deltatune.data.packing import IGNORE_INDEX, PackedRows, PackStats, Sample, best_fit_decreasing, pack
from deltatune.data.readers import DataError, read_records
from deltatune.data.tokenize import load_samples, parse_record, stop_token_ids, task_samples, to_sample

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "PackStats",
    "PackedRows",
    "Sample",
    "best_fit_decreasing",
    "load_samples",
    "pack",
    "parse_record",
    "read_records",
    "stop_token_ids",
    "task_samples",
    "to_sample",
]
