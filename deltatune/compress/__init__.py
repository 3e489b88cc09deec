"""Compression and extraction of deltas: ComPEFT, BitDelta, Delta-CoMe, and LoRA extraction by SVD.

    report = compress("adapter/", "small/", "compeft", density=0.1)           # a PEFT LoRA adapter
    report = compress(("base/", "finetuned/"), "small/", "bitdelta",
                      calibration_data=token_ids)                             # a full fine-tune
    decompress("small/", "restored/")        # dense delta, PEFT adapter or full HF model directory
    load_delta_into(model, "small/")         # add a compressed (or dense) delta to a loaded model
    report = extract_lora("base/", "finetuned/", "lora/", rank=16)          # full fine-tune -> LoRA
    print(format_report(report))

Module map: `packing` (bit packing), `base` (what a method is; raw), `compeft`, `bitdelta`,
`delta_come` (the math, pure functions over tensors), `methods` (the registry), `lowrank` (SVD),
`container` (the compressed container and loading it; inputs are read by deltatune.formats),
`pipeline` (compress), `calibrate` (BitDelta distillation on real data), `decompress`, `extract`,
`reports`.
"""

from deltatune.compress.container import load_delta_into
from deltatune.compress.decompress import decompress
from deltatune.compress.extract import extract_lora
from deltatune.compress.methods import CODECS
from deltatune.compress.pipeline import compress
from deltatune.compress.reports import CompressionReport, ExtractionReport, format_report

__all__ = [
    "CODECS",
    "CompressionReport",
    "ExtractionReport",
    "compress",
    "decompress",
    "extract_lora",
    "format_report",
    "load_delta_into",
]
