"""The papers' methods, each a small module composing the kernels, transforms and protocols.

Modules are imported on demand (``from jbyz.algorithms import marina``); this package imports
nothing heavy itself.
"""
