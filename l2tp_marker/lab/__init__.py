"""The namespace lab: real xl2tpd and simulated IPsec SAs to reproduce the multi-client failure.

See :mod:`l2tp_marker.lab.topology` for the layout and ``python -m l2tp_marker.lab --help`` for
the operator's command line.  Importing this package loads nothing heavy; the names below are
re-exported lazily from :mod:`~l2tp_marker.lab.topology`.
"""

from __future__ import annotations

__all__ = ["ClientSpec", "LabConfig", "Lab", "LabReport", "ClientResult", "LabError",
           "cleanup_prefix", "mangle_rules", "setup_commands", "run_scenario"]


def __getattr__(name: str):
    if name in __all__:
        from l2tp_marker.lab import topology
        return getattr(topology, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
