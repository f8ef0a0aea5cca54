"""Fetching weights: URLs into vitkit's cache, hub ids through huggingface_hub.

URL downloads land in `$VITKIT_HOME/weights/<file name>` (default `~/.cache/vitkit`), written atomically (a
temporary file renamed into place, so a killed download never leaves a half file that looks complete) by
`torch.hub.download_url_to_file`, with its progress bar. Where the file name carries a SHA-256 prefix
(torchvision's `vit_b_32-d86f8d99.pth`, MindCV's `vit_b_32_224-a2165e72-910v2.ckpt`: the same convention
torch.hub checks) or the sources table gives a digest, the download is checked against it before it enters
the cache. A file already in the cache is used
as is: that is how users supply weights by hand on offline machines.

Hub ids (`timm/vit_base_patch32_224.augreg_in21k_ft_in1k`, `google/vit-base-patch16-224`) use
huggingface_hub and its cache (shared with timm and transformers, so nothing is downloaded twice), honouring
`HF_HUB_OFFLINE`. `VITKIT_OFFLINE=1` or `HF_HUB_OFFLINE=1` forbid every network access; asking for something
not cached is then an error that says what to download and where to put it.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch.hub

from vitkit.errors import WeightsError

# "<stem>-<8..64 hex>[-<suffix>].<ext>": the hash prefix torch.hub and MindCV put into file names.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})(?=[-.])")


def vitkit_home() -> Path:
    return Path(os.environ.get("VITKIT_HOME") or "~/.cache/vitkit").expanduser()


def is_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(v, "").strip().lower() in truthy for v in ("VITKIT_OFFLINE", "HF_HUB_OFFLINE"))


def cache_path(url: str) -> Path:
    """Where a URL's file lives in the cache: `$VITKIT_HOME/weights/<file name from the URL>`."""
    name = Path(unquote(urlparse(url).path)).name
    if not name:
        raise WeightsError(f"cannot tell a file name from the URL {url!r}")
    return vitkit_home() / "weights" / name


def sha256_prefix_from_name(filename: str) -> str | None:
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


def _missing(url: str, path: Path, why: str) -> WeightsError:
    return WeightsError(f"{why}: {url} is not in the cache. Download it on a machine with internet access and "
                        f"put it at {path} (or pass the local file itself as pretrained=PATH)")


def download_url(url: str, *, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached file for `url`, downloading it first if needed (see the module docstring)."""
    path = cache_path(url)
    if path.is_file():
        return path
    if is_offline():
        raise _missing(url, path, "offline (VITKIT_OFFLINE/HF_HUB_OFFLINE is set)")
    expected = (sha256 or sha256_prefix_from_name(path.name) or "").lower() or None
    print(f"downloading {url} -> {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes to `<path>.<uuid>.partial` and moves it into place once the hash matched
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected, progress=progress)
    except RuntimeError as e:  # torch.hub's only error of its own: the hash
        raise WeightsError(f"checksum mismatch for {url}: {e}; the download is corrupt or was tampered with "
                           f"(nothing was written to {path})") from None
    except (OSError, ValueError) as e:  # urllib's URLError / HTTPError are OSErrors
        raise _missing(url, path, f"download failed ({getattr(e, 'reason', e)})") from None
    return path


def hub_download(repo_id: str, filename: str, *, revision: str | None = None, required: bool = True) -> Path | None:
    """One file of a Hugging Face hub repo, from huggingface_hub's cache or the hub.

    With `required=False` a file the hub says the repo does not have gives None instead of an error; a file
    that cannot be fetched (offline, no connection) is always an error.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = is_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError:
        why = "offline (VITKIT_OFFLINE/HF_HUB_OFFLINE is set)" if offline else "the hub could not be reached"
        raise WeightsError(
            f"{why}: {filename} of {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). On a "
            f"machine with internet run `hf download {repo_id}` and copy that cache folder here, or download "
            f"https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{filename} into a folder and pass the "
            f"folder (or the file) as pretrained=PATH") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise WeightsError(f"{repo_id} has no file {filename}") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"no hub repository {repo_id!r} (or it is private: log in with `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise WeightsError(f"hub error for {repo_id}/{filename}: {e}") from None
