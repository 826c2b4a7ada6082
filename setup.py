"""Build glue for the C extensions (vmk.machine._fasthooks, vmk.kernel._fastipc);
everything else is configured in pyproject.toml.

Discussion: the package ``vmk`` is the repository's top folder
(``package-dir = {"vmk" = "."}``), so setuptools would install this file as
``vmk/setup.py``; :class:`_BuildPy` leaves it out of the wheel.
"""
from setuptools import Extension, setup
from setuptools.command.build_py import build_py


class _BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir)
                if (m[0], m[1]) != ("vmk", "setup")]


setup(cmdclass={"build_py": _BuildPy},
      ext_modules=[Extension("vmk.machine._fasthooks", ["machine/_fasthooks.c"]),
                   Extension("vmk.kernel._fastipc", ["kernel/_fastipc.c"])])
