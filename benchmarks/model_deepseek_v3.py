"""Issue 15's deepseek_v3-like model, whole, against transformers' own deepseek_v3 on the same weights:
train step 4 x 512, prefill 128 and 512, greedy generation 128 + 32, one decode step.

    python benchmarks/model_deepseek_v3.py [more `moebuild bench model` options, e.g. --json --repeats 3]
"""

import sys
from pathlib import Path

from moebuild.cli import main

SPEC = Path(__file__).with_name("specs") / "deepseek_v3_like.yaml"

if __name__ == "__main__":
    main(["bench", "model", str(SPEC), "--against", "hf", *sys.argv[1:]])
