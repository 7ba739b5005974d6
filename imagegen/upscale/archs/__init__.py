"""Upscaler architectures, one folder each: the record (torch-free) in `__init__.py`, the torch
network in `net.py`. `imagegen.upscale.registry` lists them in detection order."""
