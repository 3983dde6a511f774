"""Backends: one module per inference library, all behind `base.Backend`."""
