"""Temporary entry point for tests/test_distributed.py: the CLI, then what ``cli._train`` does not
do yet: a line per rank ("[train] rank 1 of 2 (DEEPSPEED) finished") and a clean end of the
process group (``distributed.finish()``). Remove it once ``cli._train`` does both; the tests then
launch ``-m character_training.cli``.
"""
from __future__ import annotations

import sys

from character_training import cli, distributed

if __name__ == "__main__":
    try:
        code = cli.main(sys.argv[1:])
        if code == 0:
            print(f"[train] {distributed.summary()} finished", flush=True)
    finally:
        distributed.finish()
    sys.exit(code)
