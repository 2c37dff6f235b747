"""mixcli: merge and mix neural networks from a TOML project file."""

__version__ = "0.1.0"

import os  # noqa: E402

# torch's OpenMP threads sleep at a barrier instead of spinning (read once, when torch loads;
# a user's setting wins): with the cores shared, a spinning thread holds a core its peer
# needs, and an SVD on all cores of a busy 2-core machine took 5-80x its one-thread time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .architecture import ArchitectureLayout  # noqa: E402
from .components import Evaluator, MergeMethod, ModelLoader, ProjectSection, SearchStrategy, Upscaler  # noqa: E402
from .errors import MixcliError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .params import REQUIRED, param  # noqa: E402

__all__ = ["ArchitectureLayout", "Evaluator", "MergeMethod", "ModelLoader", "ProjectSection", "SearchStrategy",
           "Upscaler", "MixcliError", "hookimpl", "param", "REQUIRED", "__version__"]
