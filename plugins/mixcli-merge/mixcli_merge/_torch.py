"""``torch``, imported on first use.

Registering the methods must not import torch, so that ``mixcli list-methods`` stays fast;
the method modules use this proxy, and the real module is loaded when a merge first runs.
"""

import importlib


class _LazyTorch:
    def __getattr__(self, name):
        value = getattr(importlib.import_module("torch"), name)
        setattr(self, name, value)  # later lookups skip __getattr__
        return value


torch = _LazyTorch()
