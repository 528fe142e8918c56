"""Quantizers behind one interface (base.py); registry.py maps config.quantizer.name to them."""
