"""Adapters that fork a framework's audio to the probe's sink through :mod:`probe.tap`.

- :mod:`probe.integrations.pipecat`: :class:`ProbeTapProcessor`, a Pipecat frame processor
  (``pip install 'probe[pipecat]'``).

Each adapter imports its framework, so import the adapter module itself; this package imports
nothing.
"""
