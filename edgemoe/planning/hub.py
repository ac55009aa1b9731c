"""Hugging Face model ids as sources: `deepseek-ai/DeepSeek-V3` instead of a local folder.

Only config.json is fetched (shape-only planning needs nothing else); it lands in the usual
Hugging Face cache, so it works offline afterwards. Exporting needs the weights on disk.
"""

from __future__ import annotations

import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubError(OSError):
    """A model id that could not be resolved (offline, unknown, gated)."""


def looks_like_repo_id(source: str) -> bool:
    return not Path(source).exists() and bool(_REPO_ID.match(source))


def fetch_config(repo_id: str, revision: str | None = None) -> Path:
    """config.json of a Hub model, downloaded (or taken from the local cache)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise HubError("huggingface_hub is not installed: pip install huggingface_hub") from exc
    import logging

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries are noise here
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))
    except LocalEntryNotFoundError as exc:
        raise HubError(
            f"cannot reach the Hugging Face Hub to fetch {repo_id}/config.json and it is not "
            "in the local cache: connect to the internet once, or pass the path of a "
            "config.json you downloaded"
        ) from exc
    except GatedRepoError as exc:
        raise HubError(f"{repo_id} is gated: accept its licence on the Hub and log in "
                       "(hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"no model {repo_id!r} on the Hugging Face Hub") from exc
    except Exception as exc:  # network errors come in many classes
        raise HubError(f"could not fetch {repo_id}/config.json: {exc}") from exc
