"""Build glue for the C extensions (vmk.machine._fasthooks, vmk.kernel._fastipc);
everything else is configured in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vmk.machine._fasthooks", ["machine/_fasthooks.c"]),
                  Extension("vmk.kernel._fastipc", ["kernel/_fastipc.c"])])
