"""The version of jbyz: the one source (pyproject.toml reads it; ``jbyz.__version__``)."""

__version__ = "0.1.0"
