"""Config B of cpu-dispatch-notes.md (a DeepSeek-MoE-shaped layer): hidden 1024, 64 experts top-6,
SwiGLU 512, plus a shared SwiGLU of 1024; dense equivalent SwiGLU 4096. Decode (1, 32 tokens)
and training (2048, 8192) sizes.

    python benchmarks/moe_config_b.py [more `moebuild bench moe` options, e.g. --json --repeats 3]
"""

import sys

from moebuild.cli import main

CONFIG_B = ["bench", "moe", "--experts", "64", "--top-k", "6", "--hidden", "1024", "--intermediate", "512",
            "--shared-experts", "1024", "--tokens", "1", "--tokens", "32", "--tokens", "2048", "--tokens", "8192",
            "--backward"]

if __name__ == "__main__":
    main(CONFIG_B + sys.argv[1:])
