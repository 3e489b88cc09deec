"""LoRA extraction: a full fine-tune becomes a PEFT LoRA adapter by truncated SVD of each ΔW.

For every targeted linear weight, ΔW = W_finetuned - W_base and, with U S Vᵀ its top-r SVD,

    B = U_r √S_r  [out, r],   A = √S_r V_rᵀ  [r, in],   lora_alpha = r (scale 1)

so B A is the best rank-r approximation of ΔW (Eckart-Young), split evenly between the factors.
The report gives, per module, the captured energy Σ_{i≤r} σ_i² / ||ΔW||_F² and the relative error
||ΔW - B A||_F / ||ΔW||_F. The SVD is exact for small matrices and randomized for large ones
(`deltatune.compress.lowrank`).

Targets are the architecture's nn.Linear modules (the model is built from config.json on the meta
device, so no weights are loaded), matched by PEFT's rules: "all-linear" (minus the output layer),
a list of name suffixes, or a regex. Modules whose ΔW is zero are left out, and
`target_modules` lists the exact module paths written. Changed tensors that are not targets
(embeddings, norms, biases, an untied lm_head) cannot be a LoRA: they are skipped and listed in the
report with their relative change. Decision: no dense residual in the adapter (PEFT would need
`modules_to_save`, shipping whole embedding matrices); to keep everything, compress the
(base, finetuned) pair instead. Ranks above min(out, in) are zero-padded so one r fits all modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.atomic import new_directory
from deltatune.compress.lowrank import SvdMethod, top_singular
from deltatune.compress.reports import ExtractionReport, ModuleExtraction, SkippedTensor
from deltatune.deltas.base import PEFT_PREFIX, match_linear_modules
from deltatune.deltas.lora import Lora, LoraConfig, factors_from_svd
from deltatune.formats import MODEL_CONFIG, FormatError
from deltatune.formats.hf import ModelFiles, check_compatible
from deltatune.formats.peft import write_adapter


def lora_factors(
    delta: torch.Tensor, rank: int, svd: SvdMethod = "auto"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [rank, in], B [out, rank], captured energy) of the best rank-`rank` approximation of ΔW."""
    delta = delta.float()
    u, s, v = top_singular(delta, rank, svd)
    total = float(delta.pow(2).sum())
    energy = float(s.pow(2).sum()) / total if total > 0 else 1.0
    a, b, _ = factors_from_svd(u, s, v.T, rank)  # rank above min(out, in): zero-padded
    return a.contiguous(), b.contiguous(), min(energy, 1.0)


def model_skeleton(model_dir: Path) -> nn.Module:
    """The architecture without weights (meta device), to know which tensors belong to nn.Linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise FormatError(f"{model_dir / MODEL_CONFIG}: cannot build the model config ({err})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def extract_lora(
    base_dir: str | Path,
    finetuned_dir: str | Path,
    out_dir: str | Path,
    rank: int,
    *,
    targets: str | list[str] = "all-linear",
    svd: SvdMethod = "auto",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> ExtractionReport:
    """Write a PEFT LoRA adapter approximating finetuned - base at `rank`; see the module docstring."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    base_dir, finetuned_dir, out_dir = Path(base_dir), Path(finetuned_dir), Path(out_dir)
    linear_weights = {f"{p}.weight": p for p in match_linear_modules(model_skeleton(finetuned_dir), targets)}
    tensors: dict[str, torch.Tensor] = {}
    modules: list[ModuleExtraction] = []
    skipped: list[SkippedTensor] = []
    base_files, ft_files = ModelFiles(base_dir), ModelFiles(finetuned_dir)
    check_compatible(base_files, [ft_files], exact=True)
    absent = sorted(set(linear_weights) - set(ft_files.tensors))
    if absent:
        raise FormatError(f"{finetuned_dir}: target weight {absent[0]!r} is not in the checkpoint")
    with base_files.reader() as read_base, ft_files.reader() as read_ft:
        for name in ft_files.names():
            w_base, w_ft = read_base(name), read_ft(name)
            if not w_ft.is_floating_point():
                continue
            delta = w_ft.float() - w_base.float()
            if not torch.any(delta):
                continue
            if name not in linear_weights:
                reason = "not a LoRA target (embedding, norm, bias or excluded layer)"
                rel = float(delta.norm()) / max(float(w_base.float().norm()), 1e-30)
                skipped.append(SkippedTensor(name=name, reason=reason, rel_change=rel))
                continue
            a, b, energy = lora_factors(delta, rank, svd)
            a, b = a.to(dtype), b.to(dtype)
            path = linear_weights[name]
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
            modules.append(
                ModuleExtraction(
                    name=path,
                    shape=list(delta.shape),
                    energy=energy,
                    rel_error=float((delta - b.float() @ a.float()).norm() / delta.norm()),  # as stored
                )
            )
    if not modules:
        raise FormatError(f"{finetuned_dir}: no targeted linear weight differs from {base_dir}")
    paths = [m.name for m in modules]
    lora_config = LoraConfig(lora_r=rank, lora_alpha=float(rank), target_modules=paths)
    adapter_config = Lora().disk_config(lora_config, paths, str(base_dir.resolve()))
    adapter_config["target_modules"] = paths
    with new_directory(out_dir, overwrite) as tmp:
        write_adapter(tmp, adapter_config, tensors)
    return ExtractionReport(
        out=str(out_dir),
        rank=rank,
        modules=modules,
        skipped=skipped,
        adapter_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
    )
