"""FlexiGPT: prune and extend LLMs with low-rank weight sharing (Smith et al., NAACL 2025)."""
from .errors import FlexiError

__version__ = "0.1.0"
__all__ = ["FlexiError", "__version__"]
