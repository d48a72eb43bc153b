"""``python -m hetbatch``: the command line."""

from hetbatch.worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
