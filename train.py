"""`python train.py ...` (or `torchrun ... train.py ...`) in a checkout: the `rec-codec-train` command
(training/loop.py)."""

import sys

from training import loop


def main(argv: list[str] | None = None) -> int:
    return loop.main(argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
