"""Only here because setuptools takes `cffi_modules` from setup() alone (not from pyproject.toml).

cffi builds these extension modules at install time (out-of-line API mode).
"""

from setuptools import setup

setup(
    cffi_modules=[
        "etfs/_sendfile_cffi/build.py:ffibuilder",
        "etfs/copyrange/build.py:ffibuilder",
    ]
)
