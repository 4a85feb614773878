# Copyright: esp32-mqtt-fleet contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection options shared by the modules that talk to a board through esptool (esp32_info,
esp32_flash); module_utils/esp32_esptool.py's connection_argument_spec() is their argument spec."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  port:
    description:
      - Serial port of the board. Any pyserial URL esptool accepts, for example V(/dev/ttyUSB0),
        V(socket://127.0.0.1:5555) (no reset lines over TCP) or V(rfc2217://host:4000?ign_set_control).
    type: str
    required: true
  baud:
    description:
      - Baud rate for the session after the connection is made (esptool always syncs at 115200 first).
      - Some USB-serial adapters (CH340) fail at 921600; lower it per device then.
    type: int
    default: 460800
  before:
    description: How to put the chip into download mode before connecting (esptool's C(--before)).
    type: str
    default: default-reset
    choices: [default-reset, no-reset, no-reset-no-sync, usb-reset]
  after:
    description:
      - What to do with the chip when done (esptool's C(--after)); V(hard-reset) boots the flashed image.
    type: str
    default: hard-reset
    choices: [hard-reset, no-reset, no-reset-stub, watchdog-reset]
  chip:
    description:
      - Expected chip, as esptool names it (V(esp32), V(esp32s3), ...). V(auto) detects it.
      - With a named chip, a board of another type fails the task before anything is read or written.
    type: str
    default: auto
  connect_attempts:
    description: Connection attempts before giving up (esptool's C(--connect-attempts)).
    type: int
    default: 7
  stub:
    description: Upload and run the flasher stub (faster); V(false) talks to the ROM bootloader only.
    type: bool
    default: true
  timeout:
    description: Wall-clock limit in seconds for the whole module run; V(0) disables it.
    type: float
"""
