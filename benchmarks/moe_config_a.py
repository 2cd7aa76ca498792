"""Config A of cpu-dispatch-notes.md (a Mixtral-shaped layer): hidden 1024, 8 experts top-2,
SwiGLU 2816; dense equivalent SwiGLU 5632. Decode (1, 32 tokens) and training (2048, 8192) sizes.

    python benchmarks/moe_config_a.py [more `moebuild bench moe` options, e.g. --json --repeats 3]
"""

import sys

from moebuild.cli import main

CONFIG_A = ["bench", "moe", "--experts", "8", "--top-k", "2", "--hidden", "1024", "--intermediate", "2816",
            "--tokens", "1", "--tokens", "32", "--tokens", "2048", "--tokens", "8192", "--backward"]

if __name__ == "__main__":
    main(CONFIG_A + sys.argv[1:])
