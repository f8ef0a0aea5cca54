"""`vitkit push CKPT_OR_DIR REPO_ID [--format timm|hf] [--private] [--revision BRANCH]`: to the Hugging Face Hub.

A folder from `vitkit export --format timm|hf` is uploaded as it is. A checkpoint is exported first (vitkit/tools/
hub.py: checked against vitkit's logits, with its model card) to `<checkpoint>-<format>/` beside it, which stays
whatever happens next. The upload is huggingface_hub's (`create_repo`, `create_branch` for `--revision`,
`upload_folder`), the token whatever huggingface_hub finds (`HF_TOKEN`, or `hf auth login`). No token, offline,
unauthorised or unreachable is one line naming what to do; nothing local is removed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vitkit.args import VerbParser, at_least
from vitkit.errors import VitkitError, path_problem
from vitkit.tools.export import DEFAULT_CHECK_IMAGES, check_images, load_inputs, recorded_split, saved_config
from vitkit.tools.hub import HUB_FORMATS, export_folder
from vitkit.tools.inference import InferenceModel, load_inference_model


def build_parser() -> VerbParser:
    p = VerbParser("push", __doc__)
    p.add_argument("source", metavar="CKPT_OR_DIR", help="a vitkit checkpoint, or a folder from `vitkit export "
                   "--format timm|hf`")
    p.add_argument("repo_id", help="the Hub repository, user/name or org/name")
    p.add_argument("--format", choices=HUB_FORMATS, default="timm", help="layout a checkpoint is exported to first")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (created from main when missing)")
    p.add_argument("--commit_message", default=None)
    p.add_argument("--tolerance", type=at_least(0, float), default=1e-4,
                   help="max |logits difference| of the export's check")
    return p


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, commit_message: str) -> str:
    """create_repo + (create_branch) + upload_folder; any Hub or network failure is one VitkitError."""
    import httpx2  # huggingface_hub's HTTP client
    import huggingface_hub
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    kept = f"nothing was uploaded; {folder} is kept"
    if huggingface_hub.get_token() is None:
        raise VitkitError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {kept}")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise VitkitError(f"offline (HF_HUB_OFFLINE is set): {kept}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        what = {401: "unauthorised (check HF_TOKEN or `hf auth login`)",
                403: f"forbidden (the token may not write to {repo_id})",
                404: f"{repo_id} not found"}.get(status, (str(e).splitlines() or ["error"])[0])
        raise VitkitError(f"the Hub refused: {what}; {kept}") from None
    except (httpx2.TransportError, OSError) as e:  # no connection: DNS, refused, timeout, TLS
        detail = (str(e).splitlines() or [""])[0] or "no connection"
        raise VitkitError(f"cannot reach the Hugging Face Hub ({type(e).__name__}: {detail}); {kept}") from None
    return str(getattr(info, "commit_url", info))


def _check_inputs(source: Path, im: InferenceModel) -> tuple[torch.Tensor, str]:
    """Images for the export's check: the validation split the checkpoint's run recorded, else the bundled sample."""
    recorded = recorded_split(saved_config(str(source)), "val_split", "val")
    folder = str(recorded) if recorded is not None and recorded.is_dir() else DEFAULT_CHECK_IMAGES
    _, x, where = load_inputs(im, check_images(folder, 64), im.data_config.input_size)
    return x, where


def push(args: argparse.Namespace) -> str:
    source = Path(args.source)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise VitkitError(f"{source} has no config.json: push a folder from `vitkit export --format timm|hf`, "
                              f"or a checkpoint")
        folder = source
    elif source.is_file():
        im = load_inference_model(str(source))
        folder = source.with_name(source.name.removesuffix(".safetensors") + f"-{args.format}")
        record = export_folder(im, args.format, folder, inputs=_check_inputs(source, im), tolerance=args.tolerance,
                               repo_hint=args.repo_id)
        print(f"exported {source} to {folder} (--format {args.format}; logits within "
              f"{record['check']['max_abs_diff']:.1e} of vitkit's)")
    else:
        raise VitkitError(f"{source} {path_problem(source, want='file or folder') or 'cannot be read'}: give a "
                          f"vitkit checkpoint or an export folder")
    message = args.commit_message or f"vitkit: {source.name}"
    return upload(folder, args.repo_id, private=args.private, revision=args.revision, commit_message=message)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    url = push(args)
    print(f"pushed {args.source} to {args.repo_id}{f' ({args.revision})' if args.revision else ''}: {url}")
    return 0
