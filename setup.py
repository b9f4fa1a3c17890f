"""Build glue: the package metadata is in pyproject.toml; this file only adds the compiled kernels.

The kernel extensions are optional at install time (see kernels/build.py): glmctl runs on the
pure-torch reference when they are missing, and `glmctl kernels` says which implementation serves.
"""
import importlib.util
import os

from setuptools import setup

# kernels/build.py is loaded from its file, not imported as `kernels.build`: putting the project
# root on sys.path would let this repository's kernels/ folder shadow the PyPI package `kernels`
# (a dependency of transformers), whose setuptools hook egg_info then fails to import.
BUILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "build.py")
try:
    spec = importlib.util.spec_from_file_location("_glmctl_kernel_build", BUILD)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    extension_modules, build_ext_class = build.extension_modules, build.build_ext_class
except Exception:  # noqa: BLE001 - no torch in the build env: install without compiled kernels
    extension_modules, build_ext_class = (lambda: []), None

ext_modules = extension_modules()
cmdclass = {"build_ext": build_ext_class} if (ext_modules and build_ext_class) else {}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
