"""What every post-training method of :mod:`jaxquant.ptq` returns."""

from __future__ import annotations

from typing import Any, NamedTuple


class PTQResult(NamedTuple):
    """A post-training method's result.

    Attributes:
      variables: Linen: the new variables (the input untouched); NNX: the model, modified
        in place.
      report: layer path -> the method's numbers for that layer.
      skipped: layer path -> why the method could not apply to it.
    """

    variables: Any
    report: dict[str, dict[str, Any]]
    skipped: dict[str, str]
