"""The one compiled part of sela, the ingest's strict JPEG check (``sela/data/_jpeg.c``, against the system's libjpeg);
everything else about the package is in pyproject.toml.

It needs a C compiler and libjpeg's headers (Debian: gcc, libjpeg-dev). Optional in the build, so that a
registry-only install (``sela labels ...``) works without them; ingest refuses to run without it and says how to
build it, and ``make setup`` fails if it did not build.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sela.data._jpeg", ["sela/data/_jpeg.c"], libraries=["jpeg"], optional=True)])
