"""Importing this module registers every alignment method (each lives in its own file under align/)."""

import pipe_align.align.asif  # noqa: F401
import pipe_align.align.cca  # noqa: F401
import pipe_align.align.contrastive  # noqa: F401
import pipe_align.align.procrustes  # noqa: F401
import pipe_align.align.sotalign  # noqa: F401
from pipe_align.align import pal  # noqa: F401
