"""mixcli: merge and mix neural networks from a TOML project file."""

__version__ = "0.1.0"

from .architecture import ArchitectureLayout  # noqa: E402
from .components import Evaluator, MergeMethod, ModelLoader, ProjectSection, SearchStrategy, Upscaler  # noqa: E402
from .errors import MixcliError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .params import REQUIRED, param  # noqa: E402

__all__ = ["ArchitectureLayout", "Evaluator", "MergeMethod", "ModelLoader", "ProjectSection", "SearchStrategy",
           "Upscaler", "MixcliError", "hookimpl", "param", "REQUIRED", "__version__"]
