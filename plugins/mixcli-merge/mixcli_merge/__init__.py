"""mixcli-merge: the weight-merge methods of mixcli (mergekit 0.1.5 semantics).

One module per method; each defines a parameter dataclass, a pure tensor function and a
``METHOD`` record. Importing this package does not import torch.
"""

import mixcli

from . import (arcee_fusion, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della,
               della_linear, iso_c, iso_cts, karcher, linear, model_stock, multislerp, nearswap, nuslerp,
               passthrough, ram, ramplus_tl, sce, slerp, task_arithmetic, ties, tsv_merge)

MODULES = (linear, slerp, nuslerp, multislerp, karcher, task_arithmetic, ties, dare_ties,
           dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear, sce, model_stock,
           nearswap, arcee_fusion, ram, ramplus_tl, passthrough, tsv_merge, iso_c, iso_cts)


@mixcli.hookimpl
def register_merge_methods(register):
    for module in MODULES:
        register(module.METHOD)
