"""Frozen linear layers whose weights are stored quantized and dequantized inside the matmul.

    Nf4Linear    4-bit NormalFloat codes in blocks of 64, with double-quantized block scales
                 (8-bit scales in blocks of 256 plus one fp32 scale each, as QLoRA does): 4.127
                 bits per weight. Quantized and dequantized by bitsandbytes' CPU kernels.
    Int8Linear   int8 codes with one absmax scale per output row (LLM.int8()'s weight format, the
                 CB/SCB pair of bitsandbytes' Int8Params): 8 bits + 32 bits per row.

Why bitsandbytes (0.50.2), measured on this CPU for a 576 x 1536 weight, one thread:
bitsandbytes' native NF4 dequantize takes 0.34 ms (bf16 out), torchao 0.18's pure-PyTorch
`to_nf4(...).get_original_weight()` 5.1 ms, while the 256-token bf16 matmul itself is 2.5 ms, so
torchao's NF4 would triple the cost of every frozen matmul and bitsandbytes' adds about 14%. For
int8 both are cheap: torchao's int8 weight-only linear ran 5.4 ms vs 5.6 ms dense in fp32 (256
tokens); here the int8 codes come from bitsandbytes' `int8_vectorwise_quant` and the matmul is
plain torch: (x @ codesᵀ) · scale, codes cast to the compute dtype (exact: int8 fits in bf16), with
the row scale applied to the output so no scaled weight is built. bitsandbytes' own int8 matmul
(Linear8bitLt) also quantizes the activations, which changes the result; weight-only does not.
One library for both formats also means the NF4 codes are bit-identical to what transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)` stores for the same fp32
weights (tested), which is what makes peft's bitsandbytes path an oracle for ours.

Weights are quantized from fp32 whatever the training precision, so the codes do not depend on
it, and the compute dtype is the input's (or autocast's). Backward recomputes the dequantized
weight instead of saving it: saving it would hold a dense copy of every layer until the backward,
which is the memory the quantization exists to save.

`layer.weight` still answers (code that reads `.shape`, `.device` or the values keeps working) with a
freshly dequantized, read-only copy: writing into it raises QuantizedWeightError, because merging a
delta into the quantized codes is the known failure of naive merges (the delta is mostly lost in
rounding). Merge into the dequantized weights instead (`dequantize_model`, done by export).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK = 64  # weights per NF4 block (QLoRA's and bitsandbytes' default)


class QuantizedWeightError(ValueError):
    """A write into a quantized weight (a merge into the codes): merge into dequantized weights."""


def _bnb():
    """bitsandbytes.functional, imported on first use; its CPU backend warns at import that an
    optional fused kernel package is missing, which is noise here (the fallback is what we measured)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ValueError(
            "quantize needs bitsandbytes: pip install -c constraints.txt 'deltatune[quant]'"
        ) from None

    return bnbf


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__", "set_"}


class ReadOnlyWeight(torch.Tensor):
    """A dequantized copy of a quantized weight: reads work, in-place writes raise."""

    layer_name: str = "a quantized layer"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
        if inplace and args and isinstance(args[0], ReadOnlyWeight):
            raise QuantizedWeightError(
                f"cannot write into the weight of {args[0].layer_name}: it is stored quantized; "
                "merge into the dequantized weights instead (deltatune.quant.dequantize_model, or "
                "`deltatune export --quantize ...`, which merges in fp32)"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _QuantMatmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantized in the forward and again in the backward (nothing dense saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.project(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.layer.project_back(grad), None


class QuantizedLinear(nn.Linear):
    """A frozen nn.Linear with quantized weight storage. Subclasses store the codes and define
    `dequantize(dtype)`; `project` / `project_back` may use the codes more directly.

    The quantized state lives in plain attributes, not buffers: it is never part of a delta's
    state dict, DDP does not broadcast it, and a model-wide `.to(bfloat16)` cannot round the scales
    (`_apply` moves it between devices only)."""

    format: str = ""
    _tensors: tuple[str, ...] = ()  # attribute names of the quantized state (moved by _apply)

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # not nn.Linear.__init__: there is no dense weight parameter
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.layer_name = "a quantized layer"

    # --- what subclasses define ------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight (codes and scales; the bias is not counted)."""
        return sum(_nbytes(getattr(self, name)) for name in self._tensors)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def project_back(self, grad: torch.Tensor) -> torch.Tensor:
        return grad @ self.dequantize(grad.dtype)

    # --- the module --------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        out = self.dequantize(torch.float32).as_subclass(ReadOnlyWeight)
        out.layer_name = self.layer_name
        return out

    @weight.setter
    def weight(self, value: Any) -> None:
        raise QuantizedWeightError(
            f"cannot assign the weight of {self.layer_name}: it is stored quantized ({self.format})"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            out = _QuantMatmul.apply(x.to(dtype), self)
            return out if self.bias is None else out + self.bias.to(dtype)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.codes.device)).device
        if device != self.codes.device:
            self._to_device(device)
        return module

    def _to_device(self, device: torch.device) -> None:
        for name in self._tensors:
            setattr(self, name, getattr(self, name).to(device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Nf4Linear(QuantizedLinear):
    """NF4 codes (two per byte) + a bitsandbytes QuantState with double-quantized absmax."""

    format = "nf4"
    _tensors = ("codes", "state")

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        bnbf = _bnb()
        weight = linear.weight.detach().float().contiguous()
        self.codes, self.state = bnbf.quantize_4bit(
            weight, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4"
        )
        self._states: dict[torch.dtype, Any] = {torch.float32: self.state}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        state = self._states.get(dtype)
        if state is None:  # the same codes and scales, dequantized straight into `dtype`
            state = self._states[dtype] = copy.copy(self.state)
            state.dtype = dtype
        return _bnb().dequantize_4bit(self.codes, state)

    def quantized_bytes(self) -> int:
        s = self.state
        scales = [s.absmax, s.state2.absmax, s.state2.code, s.code, s.offset]
        return _nbytes(self.codes) + sum(_nbytes(t) for t in scales)

    def _to_device(self, device: torch.device) -> None:
        self.codes = self.codes.to(device)
        self.state.to(device)  # QuantState.to moves its tensors in place
        self._states = {torch.float32: self.state}


class Int8Linear(QuantizedLinear):
    """int8 codes [out, in] + one fp32 absmax per output row: W ≈ codes · absmax / 127."""

    format = "int8"
    _tensors = ("codes", "row_absmax")

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float().contiguous()
        self.codes, self.row_absmax, _ = _bnb().int8_vectorwise_quant(weight)

    def _scale(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.row_absmax / 127.0).to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.codes.float() * (self.row_absmax[:, None] / 127.0)).to(dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.codes.to(x.dtype)) * self._scale(x.dtype)

    def project_back(self, grad: torch.Tensor) -> torch.Tensor:
        return (grad * self._scale(grad.dtype)) @ self.codes.to(grad.dtype)


FORMATS: dict[str, type[QuantizedLinear]] = {"nf4": Nf4Linear, "int8": Int8Linear}
