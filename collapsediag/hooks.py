"""Forward hooks that exist only inside a ``with`` block (baukit-style Trace).

>>> with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True) as tr:
...     model(ids)
>>> keys = tr.input            # [batch, seq, d_in]
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .arch import get_module


class StopForward(Exception):
    """Raised by a Trace with ``stop=True`` to end the forward pass after its module."""


def hidden_of(output: object) -> torch.Tensor:
    """The hidden-state tensor of a module output (a bare tensor or the first item of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find a hidden-state tensor in {type(output).__name__}")


def replace_hidden(output: object, hidden: torch.Tensor) -> object:
    """``output`` with its hidden-state tensor replaced (same container type)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    raise TypeError(f"cannot replace the hidden state of {type(output).__name__}")


EditFn = Callable[[torch.Tensor], torch.Tensor]


class Trace:
    """Hook one module: keep its input/output, optionally edit its output or stop the forward pass.

    ``edit_output(hidden) -> hidden`` receives the output's hidden-state tensor (tuple outputs of
    decoder blocks are unwrapped and rewrapped). The hook is removed on exit, even after an error.
    """

    def __init__(self, model: nn.Module, name: str, *, retain_input: bool = False,
                 retain_output: bool = False, edit_output: EditFn | None = None,
                 stop: bool = False, detach: bool = True) -> None:
        self.name = name
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.raw_output: object = None  # the output as the module returned it (tensor or tuple)
        module = get_module(model, name)

        def hook(_mod: nn.Module, inputs: tuple, output: object) -> object:
            if retain_input:
                x = inputs[0]
                self.input = x.detach() if detach else x
            if edit_output is not None:
                output = replace_hidden(output, edit_output(hidden_of(output)))
            if retain_output:
                self.raw_output = output
                h = hidden_of(output)
                self.output = h.detach() if detach else h
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        self.close()
        return exc_type is StopForward


class TraceDict(dict):
    """Several Traces at once, keyed by module name; ``stop`` applies to the last name only."""

    def __init__(self, model: nn.Module, names: list[str], *, retain_input: bool = False,
                 retain_output: bool = False, stop: bool = False) -> None:
        super().__init__()
        try:
            for i, name in enumerate(names):
                self[name] = Trace(model, name, retain_input=retain_input, retain_output=retain_output,
                                   stop=stop and i == len(names) - 1)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook, last first."""
        for tr in reversed(list(self.values())):
            tr.close()

    def __enter__(self) -> "TraceDict":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        self.close()
        return exc_type is StopForward


class _Stub(nn.Module):
    """Stands in for a decoder block: returns ``fn(hidden_in)`` in the block's own output container."""

    def __init__(self, like: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.like, self.fn = like, fn

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        return replace_hidden(self.like, self.fn(hidden_states))


class SkipBlocks:
    """Replace blocks ``0..layer`` of ``blocks`` (a ModuleList's dotted name) for the duration of a ``with``.

    Blocks before ``layer`` pass their input through; block ``layer`` returns ``output_fn()`` — e.g. its
    cached output plus a perturbation — so a forward pass computes only the later blocks. ``like`` is a
    real output of the block (its container type is kept: a tensor or a tuple).
    """

    def __init__(self, model: nn.Module, blocks: str, layer: int, like: object,
                 output_fn: Callable[[], torch.Tensor]) -> None:
        self.list = get_module(model, blocks)
        self.layer = layer
        self.saved = [self.list[i] for i in range(layer + 1)]
        self.stubs = [_Stub(like, lambda h: h) for _ in range(layer)] + [_Stub(like, lambda _h: output_fn())]

    def __enter__(self) -> "SkipBlocks":
        for i, stub in enumerate(self.stubs):
            self.list[i] = stub
        return self

    def __exit__(self, *exc: object) -> bool:
        for i, block in enumerate(self.saved):
            self.list[i] = block
        return False
