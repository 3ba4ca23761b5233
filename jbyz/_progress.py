"""Progress bars: a notebook widget where ipywidgets is installed, a text bar otherwise.

``tqdm.auto`` warns ("IProgress not found") in a notebook without ipywidgets; jbyz then uses
the text bar, which Jupyter shows as well, without the warning.
"""

from __future__ import annotations

import importlib.util


def tqdm_class():
    """The tqdm class to use for progress bars in this session."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm
