"""`vitkit VERB ...`: thin verbs; each one's work lives in its own module's `main(argv) -> int`."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from vitkit.errors import VitkitError, disk_full_message, input_path_message

# verb -> (module with main(argv), one-line description)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("vitkit.engine.train", "train or finetune from a recipe: vitkit train -c configs/vit/... [--key value]"),
    "validate": ("vitkit.tools.validate", "top-1/top-5 of a checkpoint or pretrained weights on a dataset"),
    "predict": ("vitkit.tools.predict", "top-k classes of images: vitkit predict CKPT IMAGE|DIR"),
    "export": ("vitkit.tools.export", "export a checkpoint to onnx, torchscript, pt2, or a timm / transformers "
                                      "folder, checked against eager"),
    "push": ("vitkit.tools.push", "upload a checkpoint or export folder to the Hugging Face Hub"),
    "serve": ("vitkit.tools.serve", "HTTP service for a checkpoint or an ONNX model"),
    "benchmark": ("vitkit.tools.benchmark", "images/s, step time, memory and MFU, optionally against timm"),
    "models": ("vitkit.tools.models", "list registered models with their metadata"),
    "convert": ("vitkit.tools.convert", "convert any supported weights file to a vitkit safetensors file"),
    "data": ("vitkit.data.check", "vitkit data check DIR: unreadable files, empty classes, imbalance; "
                                  "vitkit data pack SRC DST: into tar shards"),
    "demo": ("vitkit.tools.demo", "train the built-in demo recipe on the bundled CIFAR-10 sample, then validate"),
}


def usage() -> str:
    lines = ["usage: vitkit VERB [options]   (vitkit VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<10} {desc}" for verb, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, list(VERBS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown verb '{verb}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    try:
        return int(module.main(rest) or 0)
    except VitkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        message = disk_full_message(e) or input_path_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl+C; or a stop signal the trainer handled (vitkit.engine.loop.Stopped: its line, 128 + the signal)
        message = getattr(e, "message", "interrupted")
        if message:  # empty on ranks > 0: rank 0 speaks for the run
            print(message, file=sys.stderr)
        return int(getattr(e, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
