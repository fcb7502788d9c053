"""``jaxquant sweep``: evaluate a grid of formats x granularities x calibrations x
roundings x PTQ/QAT over seeds on a task, with resumable, shardable, reproducible output.

Modules: :mod:`config` (presets, TOML, validation), :mod:`grid` (cells, specs, shards),
:mod:`tasks` (digits data, models, training), :mod:`run` (the loop and its files),
:mod:`plots`, :mod:`command` (the CLI). Nothing here is imported by ``import jaxquant``.
"""
