"""mixcli-merge: the weight-merge methods of mixcli (mergekit 0.1.5 semantics).

One module per method; each defines a parameter dataclass, a pure tensor function and a
``METHOD`` record. Importing this package does not import torch.
"""

import mixcli

from . import (breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della, della_linear,
               linear, model_stock, passthrough, slerp, task_arithmetic, ties)

MODULES = (linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
           breadcrumbs_ties, della, della_linear, model_stock, passthrough)


@mixcli.hookimpl
def register_merge_methods(register):
    for module in MODULES:
        register(module.METHOD)
