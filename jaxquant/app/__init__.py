"""The application layer: what is built *on* jaxquant rather than part of it.

``jaxquant`` (the library) is formats, quantizers, contractions and their Flax / optax /
orbax integrations. ``jaxquant.app`` uses only that public API to run experiments:

* :mod:`jaxquant.app.sweep` -- the ``jaxquant sweep`` command (grids, tasks, run
  folders, hosts, plots);
* :mod:`jaxquant.app.datasets` -- small bundled data sets (digits, the standard
  library's source as bytes);
* :mod:`jaxquant.app.models` -- the one digits MLP / CNN and the one byte-level LM that
  the sweep, benchmarks, papers, notebooks and end-to-end tests share;
* :mod:`jaxquant.app.testbed` -- the one trained byte-LM test bed (and its outlier variant)
  of the PTQ tests, papers and benchmarks;
* :mod:`jaxquant.app.training` -- the one quantized-training loop of the byte LM (the QAT
  benchmark, the 4-bit training reproductions) and paired statistics over seeds;
* :mod:`jaxquant.app.timing` and :mod:`jaxquant.app.env` -- the one timing helper and the
  one environment record of every measured result;
* :mod:`jaxquant.app.cli` -- the installed ``jaxquant`` script.

Nothing in ``jaxquant/_src`` imports this package (tests/test_imports.py checks it), and
``import jaxquant`` does not load it. Its data sets and sweep need the ``sweep`` extra.
"""

__all__: list[str] = []
