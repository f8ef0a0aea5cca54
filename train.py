"""`python train.py -c configs/vit/vit_b32_224.yaml --data_dir /path/to/imagenet`: the seed's command, as written.

The same as `vitkit train ...` (see `vitkit/engine/train.py`).
"""
import sys

from vitkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
