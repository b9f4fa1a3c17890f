"""Build glue: the package metadata is in pyproject.toml; this file only adds the compiled kernels.

The kernel extensions are optional at install time (see kernels/build.py): glmctl runs on the
pure-torch reference when they are missing, and `glmctl kernels` says which implementation serves.
"""
import os
import sys

from setuptools import setup

# pip's build backend does not put the project root on sys.path; kernels/build.py lives there.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from kernels.build import extension_modules, build_ext_class
except Exception:  # noqa: BLE001 - no torch in the build env: install without compiled kernels
    extension_modules, build_ext_class = (lambda: []), None

ext_modules = extension_modules()
cmdclass = {"build_ext": build_ext_class} if (ext_modules and build_ext_class) else {}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
