"""The progress bar focuslens uses: ``tqdm.auto``, without its ``IProgress`` warning.

In Jupyter, ``tqdm.auto`` draws widget bars when ipywidgets is installed; without it, it
falls back to text bars but warns (``TqdmWarning: IProgress not found``) on the first
import, i.e. on every ``import focuslens``. Here the same fallback happens quietly; install
ipywidgets (``pip install -e '.[notebook]'``) for widget bars.

>>> from focuslens.progress import tqdm
>>> sum(tqdm(range(3), disable=True))
3
"""

from __future__ import annotations

import warnings

from tqdm import TqdmWarning

with warnings.catch_warnings():
    # the first import of tqdm.auto decides notebook or text bars (and warns when it must pick
    # text bars in a kernel); importing it here caches that choice for every later importer too
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
