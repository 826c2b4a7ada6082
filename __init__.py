"""vmk: a bare-metal VM kernel on an emulated x86-64 PC.

Layers (imports flow down only): tools -> kernel -> hal -> boot -> machine.
"""
__version__ = "0.1.0"
