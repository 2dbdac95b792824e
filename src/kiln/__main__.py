"""`python -m kiln ...` is the same as `kiln ...` (so `torchrun -m kiln train ...` works)."""

from kiln.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
