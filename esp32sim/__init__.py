"""esp32sim: a simulated ESP32 (ROM bootloader + flasher stub + provisioned firmware)."""

__version__ = "0.1.0"
