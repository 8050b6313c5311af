"""`python compress.py encode|decode|info|models ...` in a checkout: the `rec-codec` command (codec/cli.py)."""

import sys

from codec import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, prog="compress.py")


if __name__ == "__main__":
    sys.exit(main())
