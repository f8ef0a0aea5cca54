"""`python validate.py -c CONFIG --data_dir D --ckpt_path P`: the seed's entry point, same as `vitkit validate`."""
import sys

from vitkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
