"""Triton kernels and their launchers, installed as ``metamixer_fast.kernels``.

Importing this package never requires a GPU; a module that needs triton imports it lazily.
"""
