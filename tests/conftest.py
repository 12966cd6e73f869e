"""Test-wide settings.

Generated-input tests run the same examples on every machine (`derandomize`), so a CI run passes or
fails on the code alone; set HYPOTHESIS_PROFILE=explore to draw fresh examples while hunting bugs.
"""
import os

from hypothesis import settings

settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
