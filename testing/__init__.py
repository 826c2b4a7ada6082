"""vmk.testing: the test kit for hardware-interrupt tests on virtual time."""
from .harness import Harness, SerialPort, VmkTimeout, assemble
from .trace import Flow, TraceView

__all__ = ["Flow", "Harness", "SerialPort", "TraceView", "VmkTimeout", "assemble"]
