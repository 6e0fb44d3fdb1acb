"""Measuring generated video: image fidelity, identity, hands, lip-sync, Frechet distances.

Every metric returns :class:`~omni_train.evaluation.measurement.MetricValue` objects that say
how the value was measured, or why it could not be (``value=None`` with a reason, never 0).
"""
