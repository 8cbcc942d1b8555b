"""Quantized weights by name, with torchao (the optional extra: ``pip install 'cqil-fx[quant]'``).

    from cqil_fx.tools.quant import quantize
    quantize(model, "int8-weight-only")       # in place, torchao's quantize_: weights become tensor subclasses
    fast = torch.compile(model, backend="cqil")

cqil_fx takes a model quantized any way torchao does it; this module only
names the recipes the project measures and tests, so benchmarks, examples and
the CLI say the same thing:

* ``int8-weight-only``: ``Int8WeightOnlyConfig()``, CPU and CUDA;
* ``int8-dynamic``: ``Int8DynamicActivationInt8WeightConfig()``, CPU and CUDA;
* ``int4-weight-only``: on CPU ``PrototypeInt4WeightOnlyConfig(group_size=32)``
  (torchao's CPU packing, ``Int4OpaqueTensor``); on CUDA
  ``Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")``
  (bf16; its kernel is PyTorch's own, where the default packing needs ``mslk``).

A group size must divide a linear's input features (torchao leaves a linear it
does not divide unquantized, silently): 32 and 64 divide SmolLM2's 576 and 1,536.
Note that ``quantize_`` also sets some of Inductor's global options for the
whole process (torchao's recommended settings), for every compile after it.

Weight-only int8 keeps activations in the model's dtype: compiled, it equals
its own eager run to float rounding, so a CQIL plan on it equals the plan's
eager reference on the quantized model. Dynamic int8 also quantizes
activations, per call: Inductor's kernels and eager's round differently (a
relative error of about 1e-2 between plain compiled and eager on tiny
models), and that noise is the quantization's, not the plan's.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from ..errors import CQILUnsupportedError

QUANTIZATIONS = ("int8-weight-only", "int8-dynamic", "int4-weight-only")


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def quantize(model: nn.Module, name: str, device_type: str | None = None) -> nn.Module:
    """Quantize ``model``'s linear weights in place with torchao's recipe ``name`` (module docs); returns it.

    ``device_type`` picks the int4 recipe (default: where the model's parameters are)."""
    if name not in QUANTIZATIONS:
        raise CQILUnsupportedError(f"quantization {name!r} is not one of {', '.join(QUANTIZATIONS)}")
    if not torchao_available():
        raise CQILUnsupportedError(f"quantization {name!r} needs torchao: pip install 'cqil-fx[quant]'")
    from torchao.quantization import quantize_

    device_type = device_type or next(model.parameters()).device.type
    quantize_(model, _config(name, device_type))
    return model


def _config(name: str, device_type: str):
    if name == "int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    if name == "int8-dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()
    if device_type == "cpu":
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError as e:
            raise CQILUnsupportedError("int4-weight-only on CPU needs torchao's CPU int4 packing "
                                       "(torchao.prototype.quantization.int4, torchao >= 0.14)") from e
        return PrototypeInt4WeightOnlyConfig(group_size=32)
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")
