"""Importing this module registers every alignment method (each lives in its own file under align/)."""

from align import pal  # noqa: F401
