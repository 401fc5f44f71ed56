"""A strict device check for CPU machines: find the tensors perpneg3d creates without a device.

On CUDA, a tensor made with `torch.zeros(n)` (no device=) lives on the CPU, and the first operation that
mixes it with the run's CUDA tensors fails ("Expected all tensors to be on the same device"). On a CPU every
tensor is on the CPU, so a test never sees it. Inside `strict_devices()`, every tensor that code under
perpneg3d/ creates without naming a device is marked as host-resident, marks spread to what is computed from
marked tensors alone, and an operation that mixes a marked tensor with an unmarked one (the run's tensors,
which stand for CUDA's) raises DeviceMix naming the line that made the marked one. The rules are CUDA's:
- a 0-dim tensor is a scalar that CUDA kernels accept from the host: never a mix;
- indexing a device tensor with host indices (`x[idx]`) is allowed, and so are explicit moves
  (`.to(...)`, `.cuda()`, `.copy_()`) and `.new_*` / `*_like` (they follow the tensor they are called on);
- a tensor made with a device (`device=x.device`) is unmarked.
Only perpneg3d's own factory calls are marked (the caller's file is under perpneg3d/): torch's, nerfacc's
and diffusers' creations are their own business. Autograd's backward pass is not traced (it replays the
forward's devices).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import perpneg3d

PACKAGE = str(Path(perpneg3d.__file__).resolve().parent)
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
             torch.from_numpy, torch.scalar_tensor}
# operations that may take host tensors beside device ones, or move between them
TRANSFERS = {torch.Tensor.__getitem__, torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.copy_,
             torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
             torch.Tensor.new_empty, torch.Tensor.type_as, torch.Tensor.__setitem__}
MARK = "_host_created_at"


class DeviceMix(RuntimeError):
    """An operation mixed a tensor perpneg3d made without a device with the run's tensors."""


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _mark(result, site: str):
    for t in _tensors(result, []):
        try:
            setattr(t, MARK, site)
        except (AttributeError, RuntimeError):  # a tensor type that takes no attributes
            pass
    return result


class StrictDevices(TorchFunctionMode):
    """The TorchFunctionMode of strict_devices(); `created` lists the sites of the marked creations."""

    def __init__(self):
        super().__init__()
        self.created: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            result = func(*args, **kwargs)
            frame = sys._getframe(1)
            given = kwargs.get("device") is not None or (func in (torch.tensor, torch.as_tensor) and args
                                                         and isinstance(args[0], torch.Tensor))
            if not given and str(Path(frame.f_code.co_filename).resolve()).startswith(PACKAGE):
                site = f"{Path(frame.f_code.co_filename).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
                self.created.add(site)
                return _mark(result, site)
            return result
        inputs = [t for t in _tensors(args, []) + _tensors(kwargs, []) if t.dim() > 0]
        host = [t for t in inputs if hasattr(t, MARK)]
        result = func(*args, **kwargs)
        if not host or func in TRANSFERS or func.__name__.endswith("_like"):
            return result
        if len(host) < len(inputs):
            raise DeviceMix(f"{getattr(func, '__name__', func)} mixes a tensor created without a device at "
                            f"{getattr(host[0], MARK)} with the run's tensors: on CUDA it would be on the CPU "
                            f"(create it with device=...)")
        return _mark(result, getattr(host[0], MARK))


@contextlib.contextmanager
def strict_devices():
    """with strict_devices() as check: ... raises DeviceMix where a run on CUDA would mix devices."""
    mode = StrictDevices()
    with mode:
        yield mode
