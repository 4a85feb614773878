"""Command line entry point (placeholder until the simulator lands)."""

import sys


def main(argv=None):
    print("esp32sim: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
