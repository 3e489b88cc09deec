"""AdaMerging (Yang et al., ICLR 2024): task arithmetic with coefficients learned per task and layer.

    merged = base + Σ_i λ_{i,l} d_i     for every tensor of transformer block l (one λ per task for
                                        the tensors outside the blocks)

The λ are chosen without labels: they minimise the Shannon entropy of the merged model's
next-token distribution at the end of each unlabelled prompt (the first answer token: AdaMerging's
classification entropy, for a language model), with Adam on λ only, clamped to [0, 1] after each
step as in the paper. Prompts come from `task:NAME` (a built-in task's train split, answers never
read) or a data file's prompts.

The learned merge is an ordinary task-arithmetic merge with per-layer weights, so it is written as
one: `adamerging.yaml` (a mergekit-style config with one `{filter: layers.L., value: λ}` entry per
layer and model, which mergekit itself can run) is merged by the streaming executor or the adapter
merge as usual, and `adamerging.json` beside the result keeps the λ and the entropy per step.

    merge_method: adamerging
    base_model: default                   # the model the λ are learned on (adapters: optional)
    models: [{model: a1}, {model: a2}]
    adamerging: {prompts: [task:addition, task:kv_lookup], steps: 100, lr: 0.01, init: 0.3}

During learning, adapters stay factored (hooks add λ s B A x beside each frozen layer, so the
backward pass never forms a weight gradient); full models' task vectors are held in memory and
merged per step: this is for models that fit on the machine, unlike the streaming merges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from deltatune.merge.config import AdaMergingOptions
from deltatune.merge.inputs import MergeInputs, MergeReport, layer_index

# ---------------------------------------------------------------------------------------------------
# Pure pieces


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the rows of [n, vocab]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def group_of(name: str, num_layers: int) -> int:
    """λ column of a tensor: its block index, or num_layers for tensors outside the blocks."""
    layer = layer_index(name)
    return num_layers if layer is None else layer


def merged_weights(
    params: dict[str, torch.Tensor], deltas: list[dict[str, torch.Tensor]], lam: torch.Tensor, num_layers: int
) -> dict[str, torch.Tensor]:
    """base + Σ_i λ[i, group] d_i for every tensor some task changes (differentiable in λ)."""
    out = {}
    for name in sorted(set().union(*deltas)):
        g = group_of(name, num_layers)
        update = sum(lam[i, g] * d[name] for i, d in enumerate(deltas) if name in d)
        out[name] = params[name] + update
    return out


def equivalent_config(
    cfg_models: list[str], base: str | None, lam: list[list[float]], num_layers: int, adapters: bool
) -> dict[str, Any]:
    """The learned merge as a plain task-arithmetic config: per-layer weights by filter."""
    models = []
    for name, row in zip(cfg_models, lam, strict=True):
        weight = [{"filter": f"layers.{layer}.", "value": row[layer]} for layer in range(num_layers)]
        weight.append({"value": row[num_layers]})  # embeddings, final norm, head
        models.append({"model": name, "parameters": {"weight": weight}})
    config: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "models": models,
        "parameters": {"lambda": 1.0},
    }
    if base is not None and not adapters:
        config["base_model"] = base
    return config


# ---------------------------------------------------------------------------------------------------
# Learning λ


def _task_vectors(inputs: MergeInputs, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per input, {parameter name: d_i} in the model's own parameter names (fp32), or for
    adapters {module path: LoraFactors}."""
    from deltatune.formats.hf import ModelFiles
    from deltatune.formats.peft import read_lora

    params = dict(model.named_parameters())
    vectors = []
    for path in inputs.models:
        if inputs.adapters:  # kept as factors: the forward adds λ s B A x beside the frozen layer
            vectors.append(dict(read_lora(path).modules))
            continue
        files = ModelFiles(path)
        with files.reader() as read:
            d = {}
            for name, p in params.items():
                source = files.source_name(name)
                if source is not None:
                    delta = read(source).float() - p.detach().float()
                    if bool(delta.any()):
                        d[name] = delta
            vectors.append(d)
    return vectors


def _prompt_batches(options: AdaMergingOptions, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from deltatune.data.tokenize import left_pad, prompt_ids
    from deltatune.serve.router import example_prompts

    rows = [
        prompt_ids(tokenizer, p)
        for spec in options.prompts
        for p in example_prompts(spec, options.prompts_per_source)
    ]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(options.seed)).tolist()
    rows = [rows[i] for i in order]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [left_pad(rows[i : i + options.batch_size], pad) for i in range(0, len(rows), options.batch_size)]


def _lora_hooks(model: torch.nn.Module, factors: list[dict], lam: torch.Tensor, num_layers: int) -> list:
    """Forward hooks adding Σ_i λ[i, block] s_i B_i A_i x to each adapted linear layer."""
    modules = dict(model.named_modules())
    handles = []
    for name in sorted(set().union(*factors)):
        parts = [
            (i, f.a.float(), f.b.float(), f.scale) for i, fs in enumerate(factors) if (f := fs.get(name))
        ]
        g = group_of(name, num_layers)

        def hook(module, args, out, parts=parts, g=g):
            x = args[0]
            return out + sum(lam[i, g] * scale * ((x @ a.T) @ b.T) for i, a, b, scale in parts)

        handles.append(modules[name].register_forward_hook(hook))
    return handles


def learn_coefficients(
    model: torch.nn.Module,
    deltas: list[dict],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    options: AdaMergingOptions,
    num_layers: int,
    adapters: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """λ [tasks, num_layers + 1] minimising the entropy of the last prompt position; and the curve.

    Adapters run the frozen model with hooks (backward only through activations and the low-rank
    paths); full models run on merged weights built from λ at every step (torch.func)."""
    from torch.func import functional_call

    for p in model.parameters():
        p.requires_grad_(False)
    params = dict(model.named_parameters())
    lam = torch.full((len(deltas), num_layers + 1), options.init, requires_grad=True)
    optimizer = torch.optim.Adam([lam], lr=options.lr)
    handles = _lora_hooks(model, deltas, lam, num_layers) if adapters else []
    curve = []
    try:
        for step in range(options.steps):
            ids, mask = batches[step % len(batches)]
            kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                      "logits_to_keep": 1}  # fmt: skip
            if adapters:
                out = model(**kwargs)
            else:
                weights = merged_weights(params, deltas, lam, num_layers)
                out = functional_call(model, weights, args=(), kwargs=kwargs, strict=False)
            loss = mean_entropy(out.logits[:, -1])  # left-padded: the last column is every prompt's end
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)
            curve.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
    return lam.detach(), curve


def run_adamerging(cfg, inputs: MergeInputs, out_dir: Path, threads: int) -> MergeReport:
    """Learn λ, then run the equivalent task-arithmetic merge and store λ beside it."""
    from deltatune.atomic import new_directory
    from deltatune.formats import ADAPTER_CONFIG, read_json
    from deltatune.merge.config import parse_config
    from deltatune.models import load_model, load_tokenizer

    started = time.perf_counter()
    target = new_directory(out_dir)  # an occupied or unwritable OUT fails before any learning
    options = cfg.adamerging
    base = str(inputs.base) if inputs.base is not None else None
    if base is None:  # adapters: the base they were trained on
        base = read_json(inputs.models[0] / ADAPTER_CONFIG).get("base_model_name_or_path") or "default"
    torch.manual_seed(options.seed)
    model = load_model(base, dtype=torch.float32).eval()
    num_layers = int(model.config.num_hidden_layers)
    deltas = _task_vectors(inputs, model)
    batches = _prompt_batches(options, load_tokenizer(base))
    lam, curve = learn_coefficients(model, deltas, batches, options, num_layers, inputs.adapters)
    del model, deltas
    names = [str(p) for p in inputs.models]
    config = equivalent_config(
        names, base if not inputs.adapters else None, lam.tolist(), num_layers, inputs.adapters
    )
    text = yaml.safe_dump(config, sort_keys=False)
    record = {
        "coefficients": lam.tolist(),
        "entropy": curve,
        "options": options.model_dump(),
        "models": names,
    }
    from deltatune.merge.executor import merge_from_config

    with target as tmp:  # the merge, its config and the λ appear together or not at all
        report = merge_from_config(parse_config(text, "adamerging.yaml"), tmp / "merged", threads)
        for file in (tmp / "merged").iterdir():
            file.rename(tmp / file.name)
        (tmp / "merged").rmdir()
        (tmp / "adamerging.yaml").write_text(text)
        (tmp / "adamerging.json").write_text(json.dumps(record, indent=2) + "\n")
    report.method, report.out_dir = "adamerging", Path(out_dir)
    report.seconds = time.perf_counter() - started
    return report
