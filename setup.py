"""Build glue for the one C extension (vmk.machine._fasthooks); everything
else is configured in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vmk.machine._fasthooks", ["machine/_fasthooks.c"])])
