"""Import torchvision beside a CPU-only torch build.

PyPI's torchvision wheel links its C++ ops against CUDA libraries that the ``+cpu`` torch does not ship,
so loading ``torchvision/_C.so`` fails quietly; ``_meta_registrations.py`` then registers fake kernels for
``torchvision::nms`` / ``qnms`` unconditionally and the import dies with
``RuntimeError: operator torchvision::nms does not exist``. clean-fid imports torchvision at module level
(``cleanfid.fid``) but never uses its C++ ops, so defining the two op schemas first is enough.

The schemas are defined *only* after that exact error, so a torchvision whose ``_C`` does load (a CUDA
install) is never touched.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_library_keepalive: list[torch.library.Library] = []


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, patching around the missing-ops error when needed."""
    try:
        import torchvision

        return torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    # Drop the half-imported package so the second import starts clean.
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library_keepalive.append(lib)  # the schemas live as long as the Library object
    import torchvision

    return torchvision


def import_cleanfid_fid() -> ModuleType:
    """``cleanfid.fid`` (which imports torchvision at module level), importable on a CPU torch."""
    import_torchvision()
    from cleanfid import fid

    return fid
