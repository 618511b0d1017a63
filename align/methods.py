"""Importing this module registers every alignment method (each lives in its own file under align/)."""

import align.asif  # noqa: F401
import align.cca  # noqa: F401
import align.contrastive  # noqa: F401
import align.procrustes  # noqa: F401
import align.sotalign  # noqa: F401
from align import pal  # noqa: F401
