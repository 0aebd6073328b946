"""A stand-in for Pillow, for the PyTorch reference bench only.

scripts/gpu-check.sh puts tools/gpu/pil_standin on PYTHONPATH only when the GPU machine's Python cannot import
PIL. diffusers imports Pillow when it is imported (image processors, export helpers), but the reference bench
runs models on tensors and never opens, makes or converts an image. Every name of every PIL module resolves to
a placeholder class: type hints, `isinstance` checks (always False) and enum look-ups at import time work;
creating or calling anything raises, so a use of Pillow is never silent.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "10.4.0"  # what diffusers' import-time version checks read


class _AbsentMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _absent(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(
            f"{cls.__qualname__}: Pillow is not installed on this machine (tools/gpu/pil_standin stands in "
            "for it so that diffusers imports; the reference bench should never need an image)"
        )


def _absent(qualname):
    cls = _AbsentMeta(qualname.rsplit(".", 1)[-1], (), {})
    cls.__qualname__ = qualname
    return cls


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _absent(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every `PIL.<module>` a stand-in module."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__version__ = __version__


sys.meta_path.insert(0, _Finder())
