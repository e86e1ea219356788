"""Publish an output folder to the Hugging Face Hub with ``huggingface_hub`` (``--push-to-hub``).

The folder is complete on disk before anything is sent; a failure (no token, no network, a refused
request) is one PublishError line and leaves it as it is. The token is read by huggingface_hub
(HF_TOKEN, or the file ``hf auth login`` writes) and never printed: messages are redacted.
HF_ENDPOINT is read at call time, so a test or a private Hub mirror can stand in for the Hub.
With ``hf_xet`` installed, huggingface_hub uploads the weights through Xet storage; with
HF_HUB_DISABLE_XET=1 (read when huggingface_hub is imported) through the LFS protocol.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PublishError, UsageError
from .save import redact


def check_repo_id(repo_id: str) -> None:
    """Refuse, before any work, a repository id the Hub would refuse ("name" or "namespace/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"--push-to-hub {repo_id!r}: not a valid repository id "
                         f"({str(error).splitlines()[0]})") from None


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _reason(error: BaseException) -> str:
    """One line saying why a Hub call failed, with secrets removed."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    cause = error.__cause__ or error.__context__
    if status is None and cause is not None and "Error while uploading" in first:
        return _reason(cause)
    text = f"HTTP {status}: {first}" if status is not None and str(status) not in first else first
    return redact(text)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload every file of ``folder`` in one commit. Returns the
    repository URL; raises PublishError saying why it failed and that the local folder is kept."""
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    endpoint = _endpoint()
    kept = f"the output folder {str(folder)!r} is complete and kept"
    token = get_token()
    if not token:
        raise PublishError(f"cannot publish to {repo_id}: no Hugging Face token (set HF_TOKEN or run "
                           f"`hf auth login`); {kept}")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or f"Upload {folder.name} (llmprune)")
    except KeyboardInterrupt:
        raise
    except Exception as error:  # HTTP refusals, connection errors, malformed answers
        raise PublishError(f"cannot publish to {repo_id} at {endpoint}: {_reason(error)}; {kept}") from None
    return f"{endpoint}/{repo_id}"
