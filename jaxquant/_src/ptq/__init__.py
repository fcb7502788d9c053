"""Post-training methods for transformers (issue 14): each module one method, each built on
the layer statistics pass (:mod:`jaxquant._src.flax.statistics`), the online activation
transforms (:mod:`jaxquant._src.flax.act_transform`) and the converted QArray tree of
:func:`jaxquant.flax.convert`; the public names are in :mod:`jaxquant.ptq`."""
