"""Optional dependencies: which feature needs which pip extra, and the error that says so.

``import jaxquant`` needs only the core dependencies; checkpoints (``checkpoint``) and the
application layer's sweep, plots and data sets (``sweep``) import their packages when first
used and raise :class:`MissingExtraError`, naming the extra to install, when they are missing.
"""

from jaxquant._src.extras import MissingExtraError, missing_extra, require_extra

__all__ = ["MissingExtraError", "missing_extra", "require_extra"]
