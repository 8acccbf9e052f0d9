"""Old home of the PNG helpers; everything here lives in `ffnjax.view` now.

Kept so that ``from ffnjax.viz import save_slices_png`` and ``ffnjax.viz.overlay``
keep working.
"""

from ffnjax.view import (boundaries, default_slices, label_colors, montage, overlay,  # noqa: F401
                         save_png, save_slices_png)
