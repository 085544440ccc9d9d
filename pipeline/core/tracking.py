"""Which layers are tracked, and the capture of their inputs and output gradients.

A tracked layer is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's
transposed linear) whose qualified module name fully matches the
``model.modules`` regular expression. Everything downstream works in the
``(d_out, d_in)`` convention of docs/design.md#maths, with the bias folded in as a
trailing input column of ones.

The capture never asks autograd for weight gradients: the loss is
differentiated with respect to the tracked layers' *outputs* only
(``torch.autograd.grad``), which is the cheapest backward that still yields
``g[n, t]`` for every tracked layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# The MLP linear layers of every block, as in Grosse et al. (2023). Matches
# GPT-2 (`transformer.h.0.mlp.c_fc`), Llama (`model.layers.0.mlp.up_proj`) and
# GPT-NeoX (`gpt_neox.layers.0.mlp.dense_h_to_4h`).
DEFAULT_MODULES = r".*\.mlp\..*"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it today
        return None
    return Conv1D


@dataclass(frozen=True)
class LayerSpec:
    """Shape facts of one tracked layer, in the ``(d_out, d_in)`` convention.

    ``d_in`` counts the bias column when ``has_bias``; ``transposed`` is true for
    ``Conv1D``, whose weight is stored ``(d_in, d_out)``.
    """

    name: str
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "has_bias": self.has_bias,
            "transposed": self.transposed,
        }


class NoTrackedModulesError(ValueError):
    pass


def find_tracked_layers(model: nn.Module, pattern: str = DEFAULT_MODULES) -> dict[str, LayerSpec]:
    """Return the tracked layers of ``model`` by name, in module order.

    Raises ``NoTrackedModulesError`` listing some linear layer names when the
    pattern matches none, so the user can fix ``model.modules``.
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"model.modules={pattern!r} is not a valid regular expression: {exc}") from exc
    conv1d = _conv1d_type()
    linear_types: tuple[type, ...] = (nn.Linear,) + ((conv1d,) if conv1d else ())
    specs: dict[str, LayerSpec] = {}
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, linear_types):
            continue
        candidates.append(name)
        if not regex.fullmatch(name):
            continue
        has_bias = getattr(module, "bias", None) is not None
        if conv1d is not None and isinstance(module, conv1d):
            d_in, d_out = module.weight.shape
            transposed = True
        else:
            d_out, d_in = module.weight.shape
            transposed = False
        specs[name] = LayerSpec(name, d_in + int(has_bias), d_out, has_bias, transposed)
    if not specs:
        shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
        raise NoTrackedModulesError(
            f"model.modules={pattern!r} matches no nn.Linear/Conv1D layer of "
            f"{type(model).__name__}; its linear layers include: {shown or '(none)'}"
        )
    return specs


# A per-layer transform applied to captured vectors as soon as they are seen,
# e.g. a projection ``x -> x @ P.T``. ``None`` keeps them at full size.
VectorTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Captured:
    """Per-token vectors of one tracked layer for one batch.

    ``a``: ``(batch, tokens, d_in')`` layer inputs (with the bias column,
    transformed); ``g``: ``(batch, tokens, d_out')`` gradients of the summed
    loss w.r.t. the layer outputs (transformed). Masked positions are zero.
    ``mask``: ``(batch, tokens)``, True = real token, when the batch was
    recorded with one; per-token products can then skip the padding
    (``real_tokens``), whose vectors are zero and add nothing.
    """

    a: torch.Tensor
    g: torch.Tensor
    mask: torch.Tensor | None = None

    def real_tokens(self) -> torch.Tensor | None:
        """Flat indices (into ``batch * tokens``) of the real tokens, or None when no position is padding."""
        if self.mask is None:
            return None
        flat = self.mask.reshape(-1)
        if bool(flat.all()):
            return None
        return flat.nonzero().squeeze(1)


class LayerCapture:
    """Forward hooks that record the tracked layers' inputs and outputs.

    Use as ``with capture.recording(mask): out = model(...)``, then
    ``capture.backward(loss)`` returns ``{name: Captured}``. Inputs are
    transformed (``transform_in[name]``) in the forward hook, so at full size
    only what autograd keeps anyway is held; output gradients are transformed
    right after the backward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LayerSpec],
        transform_in: dict[str, VectorTransform] | None = None,
        transform_out: dict[str, VectorTransform] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.model = model
        self.layers = layers
        self.transform_in = transform_in or {}
        self.transform_out = transform_out or {}
        self.dtype = dtype
        modules = dict(model.named_modules())
        self._modules = {name: modules[name] for name in layers}
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def _hook(self, name: str):
        spec = self.layers[name]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # The forward may run under bf16 autocast; captured vectors are computed in self.dtype.
            with torch.autocast(args[0].device.type, enabled=False):
                a = args[0].detach().to(self.dtype)
                if spec.has_bias:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                if self._mask is not None:
                    a = a * self._mask.unsqueeze(-1).to(a.dtype)
                transform = self.transform_in.get(name)
                self._inputs[name] = transform(a) if transform is not None else a
            self._outputs[name] = output

        return hook

    @contextmanager
    def recording(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Record during one forward pass; ``mask``: ``(batch, tokens)``, 1 = real token."""
        self._inputs.clear()
        self._outputs.clear()
        self._mask = mask
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def backward(self, loss: torch.Tensor) -> dict[str, Captured]:
        """Differentiate ``loss`` w.r.t. the recorded outputs; return per-layer vectors."""
        names = list(self._modules)
        missing = [n for n in names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"tracked layers did not run in the forward pass: {missing[:4]}")
        outputs = [self._outputs[n] for n in names]
        if not all(o.requires_grad for o in outputs):
            raise RuntimeError(
                "tracked layer outputs do not require grad; call prepare_model() so the "
                "tracked weights require grad"
            )
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        mask = None if self._mask is None else self._mask.to(torch.bool)
        captured: dict[str, Captured] = {}
        for name, out, grad in zip(names, outputs, grads):
            g = torch.zeros_like(out) if grad is None else grad
            g = g.detach().to(self.dtype)
            if self._mask is not None:
                g = g * self._mask.unsqueeze(-1).to(g.dtype)
            transform = self.transform_out.get(name)
            captured[name] = Captured(self._inputs[name], transform(g) if transform is not None else g, mask)
        self._inputs.clear()
        self._outputs.clear()
        return captured


def prepare_model(model: nn.Module, layers: dict[str, LayerSpec]) -> nn.Module:
    """Eval mode; only the tracked weights require grad, so backward stops at the first tracked layer."""
    model.eval()
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in layers:
        modules[name].weight.requires_grad_(True)
    return model


def weight_gradient(module: nn.Module, spec: LayerSpec) -> torch.Tensor:
    """The ``.grad`` of a tracked module in the ``(d_out, d_in)`` convention (bias last).

    Used by tests and references that run autograd the ordinary way.
    """
    grad = module.weight.grad
    if spec.transposed:
        grad = grad.T
    if spec.has_bias:
        grad = torch.cat([grad, module.bias.grad.unsqueeze(-1)], dim=-1)
    return grad
