"""An eval-mode view of a model with each BatchNorm folded into the convolution before it.

In eval mode BatchNorm is a fixed affine map per channel, so ``bn(conv(x))`` equals one
convolution with rescaled weights. An attack calls the model K times forward and backward;
folding removes every BatchNorm kernel from both passes (about 10% of a ResNet attack on CPU,
see ``bench/attacks.py``).

The view is traced once per model with ``torch.fx`` and cached; it shares the model's modules,
and the folded weights are recomputed from the live parameters and running statistics every
time :func:`folded_eval_view` is called, so it is always current during training. Models that
cannot be traced, have hooks, contain nothing to fold, or whose view does not reproduce the
model on a probe input get no view (None), and callers use the model itself.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class ChannelsLast(nn.Module):
    """The view's entry: its input in channels_last layout (the gradient flows back unchanged)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x)


class FoldedConvBN(nn.Module):
    """``bn(conv(x))`` for an eval-mode ``bn``, as one convolution with weights set by :meth:`refresh`."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self._pair = (conv, bn)  # a plain tuple: not registered, so no parameters are duplicated
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None

    @torch.no_grad()
    def refresh(self) -> None:
        conv, bn = self._pair
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        # channels_last: oneDNN (CPU) and cuDNN run convolutions and pooling faster in NHWC.
        self.weight, self.bias = w.detach().contiguous(memory_format=torch.channels_last), b.detach()

    def forward(self, x):
        return self._pair[0]._conv_forward(x, self.weight, self.bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
    )


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in model.modules())


def _build(model: nn.Module) -> Optional[nn.Module]:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow, unsupported ops ...: no view
        return None
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv, bn = modules[prev.target], modules[node.target]
        if not _foldable(conv, bn):
            continue
        name = f"folded_{folded}"
        gm.add_submodule(name, FoldedConvBN(conv, bn))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, prev.args, prev.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(prev)
        folded += 1
    if not folded:
        return None
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return ChannelsLast(gm)


def _refresh(view: nn.Module) -> None:
    for m in view.modules():
        if isinstance(m, FoldedConvBN):
            m.refresh()


def _matches(view: nn.Module, model: nn.Module, example: torch.Tensor) -> bool:
    # Compared in float32 even when called under bf16 autocast (the CUDA trainer's attack): bf16
    # rounding differs between the folded and unfolded convolutions, and a view refused here
    # is never used for that model.
    try:
        with torch.no_grad(), torch.autocast(example.device.type, enabled=False):
            want, got = model(example), view(example)
    except Exception:
        return False
    scale = 1 + want.detach().abs().max().item()
    return want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-4 * scale)


def folded_eval_view(model: nn.Module, example: torch.Tensor) -> Optional[nn.Module]:
    """The folded view of ``model`` (which must be in eval mode now), or None if it has none.

    A new view is checked once against the model on ``example`` (a few real inputs); one
    that does not reproduce the model's output is never used for that model.
    """
    if model.training or _has_hooks(model) or hasattr(model, "_orig_mod"):
        return None
    signature = tuple(id(m) for m in model.modules())
    cached = _CACHE.get(model)
    if cached is None or cached[0] != signature:
        view = _build(model)
        if view is not None:
            _refresh(view)
            view = view if _matches(view, model, example.detach()[:2]) else None
        _CACHE[model] = (signature, view)
        return view
    view = cached[1]
    if view is not None:
        _refresh(view)
    return view
