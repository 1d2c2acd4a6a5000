"""l2tp-marker: per-client SA marks and tunnel-ID translation for L2TP/IPsec behind one NAT."""

__version__ = "0.1.0"
