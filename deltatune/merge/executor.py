"""The streaming merge: for each tensor name, read the inputs, apply the method, write the result.

`run_merge(config, out_dir)` is what `deltatune merge CONFIG.yaml OUT_DIR` calls. It checks the
config and the inputs (every input holds exactly the reference's tensor names and shapes: a
deeper or shallower model is refused, naming the first missing or extra tensor) before it
computes anything, then hands work to a thread pool, one transformer block (or one tensor outside
the blocks) at a time, largest first so the pool drains evenly. A worker memory-maps the block's
tensors in each input (one safe_open per file and block), computes each merged tensor with the
method's pure function and `pwrite`s it into the pre-laid-out output shard. Peak memory is a few
blocks' tensors times the number of inputs, whatever the model size.

Methods that are elementwise once a few whole-tensor statistics are known (linear, task arithmetic,
TIES and Breadcrumbs given their magnitude thresholds, DARE given its generators) are applied to
flat chunks of each big tensor: the statistics are computed in streaming passes, then the method's
own function runs on slices, so not even the embedding matrix exists in full as a temporary.
While the pool runs, torch's own intra-op threads are set to 1: parallelism comes from the pool,
and on a busy machine OpenMP's barriers cost more than they save (measured here: a linear merge of
three 135M models took 50 s with torch's 2 OpenMP threads and no pool, 2.5 s with the pool).

The output directory gets the merged weights (one `model.safetensors`, or shards plus
`model.safetensors.index.json`), the base model's config.json (dtype updated) and its generation
config and tokenizer files; it is written in a temporary directory and renamed into place.
Directories holding PEFT adapters are merged in adapter space instead (deltatune.merge.adapters).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from deltatune.atomic import new_directory
from deltatune.formats.hf import ModelFiles, ShardedWriter, check_compatible, copy_side_files
from deltatune.merge.config import MergeConfig, ParameterResolver, load_config, parse_size
from deltatune.merge.inputs import (
    MergeInputs,
    MergeReport,
    layer_index,
    method_kwargs,
    resolve_inputs,
    torch_dtype,
)

CHUNK_ELEMENTS = 1 << 18


@contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _merge_models(cfg: MergeConfig, inputs: MergeInputs, out_dir: Path, threads: int) -> MergeReport:
    started = time.perf_counter()
    spec = cfg.spec
    models = [ModelFiles(p) for p in inputs.models]
    base = ModelFiles(inputs.base) if inputs.base is not None else None
    reference = base or models[0]
    check_compatible(reference, [m for m in models if m is not reference], exact=True)
    num_layers = reference.num_layers() or 1 + max(
        (layer_index(n) for n in reference.tensors if layer_index(n) is not None), default=0
    )
    out_dtype = torch_dtype(cfg.out_dtype or cfg.dtype)
    resolver = ParameterResolver(spec, cfg.parameters or {}, inputs.params, inputs.names)

    def dtype_of(name: str) -> torch.dtype:
        own = reference.tensors[name].dtype
        return out_dtype if out_dtype is not None and own.is_floating_point else own

    names = sorted(reference.tensors, key=lambda n: (reference.tensors[n].file.name, n))
    entries = [(n, dtype_of(n), reference.tensors[n].shape) for n in names]

    groups = _layer_groups(names, lambda n: reference.tensors[n].numel)
    with new_directory(out_dir) as tmp:
        writer = ShardedWriter(tmp, entries, parse_size(cfg.shard_size))

        def merge_group(group: Sequence[str]) -> int:
            with ExitStack() as stack:
                readers = [stack.enter_context(m.reader()) for m in models]
                read_base = stack.enter_context(base.reader()) if base is not None else None
                return sum(
                    _merge_tensor(cfg, name, read_base, readers, resolver, num_layers, dtype_of(name), writer)
                    for name in group
                )

        try:
            _run_pool(merge_group, groups, threads)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        copy_side_files(reference.directory, tmp, out_dtype)
    return MergeReport(
        method=cfg.merge_method,
        out_dir=Path(out_dir),
        kind="model",
        tensors=len(names),
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - started,
    )


def _merge_tensor(
    cfg: MergeConfig,
    name: str,
    read_base: Callable[[str], torch.Tensor] | None,
    readers: Sequence[Callable[[str], torch.Tensor]],
    resolver: ParameterResolver,
    num_layers: int,
    out_dtype: torch.dtype,
    writer: ShardedWriter,
) -> int:
    """Merge one tensor and write it; returns the bytes written."""
    tensors = [read(name) for read in readers]
    base = read_base(name) if read_base is not None else None
    reference = base if base is not None else tensors[0]
    if not reference.is_floating_point():  # integer buffers are copied, not merged
        return writer.write(name, reference)
    spec = cfg.spec
    kwargs = method_kwargs(cfg, resolver, name, num_layers)
    as_matrix = spec.spectral and reference.dim() == 2 and kwargs.get("as_matrix", True)
    if as_matrix or spec.statistics is None or reference.numel() <= CHUNK_ELEMENTS:  # SVDs see it whole
        return writer.write(name, spec.fn(base, tensors, **kwargs).to(out_dtype))
    flat = [t.reshape(-1) for t in tensors]
    flat_base = base.reshape(-1) if base is not None else None
    kwargs |= spec.statistics(flat_base, flat, **kwargs)
    written = 0
    for start in range(0, reference.numel(), CHUNK_ELEMENTS):
        part = slice(start, start + CHUNK_ELEMENTS)
        chunk = spec.fn(None if flat_base is None else flat_base[part], [t[part] for t in flat], **kwargs)
        written += writer.write(name, chunk.to(out_dtype), start)
    return written


def _layer_groups(names: Sequence[str], numel: Callable[[str], int]) -> list[list[str]]:
    """One work item per transformer block (tensors outside blocks alone), largest first."""
    groups: dict[object, list[str]] = {}
    for name in names:
        layer = layer_index(name)
        groups.setdefault(name if layer is None else layer, []).append(name)
    return sorted(groups.values(), key=lambda g: -sum(numel(n) for n in g))


def _run_pool(task: Callable[[Any], int], items: Sequence[Any], threads: int) -> None:
    """Run `task` over items with `threads` workers; the first failure cancels the rest and is raised."""
    with _torch_threads(1):
        if threads <= 1:
            for item in items:
                task(item)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
            futures = [pool.submit(task, item) for item in items]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for f in futures:
                    f.cancel()
                raise failed.exception()


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_merge(config_path: Path, out_dir: Path, *, threads: int | None = None) -> MergeReport:
    """Merge the models (or PEFT adapters) named in a mergekit-style YAML into `out_dir`."""
    return merge_from_config(load_config(config_path), Path(out_dir), threads)


def merge_from_config(cfg: MergeConfig, out_dir: Path, threads: int | None = None) -> MergeReport:
    """The merge a parsed config describes: learned, in adapter space, or tensor by tensor."""
    inputs = resolve_inputs(cfg)
    threads = threads or default_threads()
    if cfg.spec.learned:
        from deltatune.merge.adamerging import run_adamerging

        return run_adamerging(cfg, inputs, Path(out_dir), threads)
    if inputs.adapters:
        from deltatune.merge.adapters import merge_adapters

        return merge_adapters(cfg, inputs, Path(out_dir))
    return _merge_models(cfg, inputs, Path(out_dir), threads)
