"""mixcli-layers: layer-level mixing for mixcli.

* ``frankenmerge``: layer ranges of one or several models stacked (passthrough slices);
* ``depth_upscaling``: one model's layers re-stacked by a layer spec (SOLAR);
* ``model_recombination``: n same-architecture models recombined by seeded permutations.

One module per method; ``layer_spec`` holds the layer-spec grammar. Importing this package
does not import torch (``mixcli list-methods`` stays fast).
"""

import mixcli

from . import depth_upscaling, frankenmerge, model_recombination

__version__ = "0.1.0"
MODULES = (frankenmerge, depth_upscaling, model_recombination)


@mixcli.hookimpl
def register_upscalers(register):
    for module in MODULES:
        register(module.METHOD)
