"""vmk.testing: the test kit for hardware-interrupt tests on virtual time."""
from .harness import Harness, SerialPort, VmkTimeout, assemble

__all__ = ["Harness", "SerialPort", "VmkTimeout", "assemble"]
