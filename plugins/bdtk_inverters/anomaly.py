"""Neural Cleanse's outlier test, now part of the core's inversion toolkit; kept importable here.

The MAD anomaly index and the flagging rule live in `backdoor_toolkit` (`anomaly_index`,
`flag_targets`), so that every inverter and purifier scores trigger norms the same way; this
module re-exports them for code that imported them from the plugin.
"""

from backdoor_toolkit import MAD_CONSISTENCY, anomaly_index, flag_targets

__all__ = ["MAD_CONSISTENCY", "anomaly_index", "flag_targets"]
