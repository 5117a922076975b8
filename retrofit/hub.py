"""Share an export on the Hugging Face Hub: ``create_repo`` and ``upload_folder`` of the folder as written.

What is uploaded is exactly what :func:`retrofit.export` wrote and a user may have checked (weights,
config.json with the registers in ``model_args``, the model card), so ``timm.create_model("hf-hub:USER/NAME",
pretrained=True)`` builds the local model. Nothing is loaded or written again; a push that fails leaves the
local export as it was.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import validate_repo_id

from ._export import is_export_dir
from .errors import RetrofitError, first_line

LOGIN_HINT = "run `hf auth login` or set HF_TOKEN to a token with write access"


def check_repo(repo_id: str, token: str | None = None) -> str:
    """Refuse a malformed repo id or a missing token before any work is done (no network)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise RetrofitError(
            f"{repo_id!r} is not a Hub repo id: use USER/NAME of letters, digits, '-', '_' and '.'."
        ) from e
    if "/" not in repo_id:
        raise RetrofitError(f"{repo_id!r} names no owner: use USER/NAME (or ORG/NAME).")
    if token is None and get_token() is None:
        raise RetrofitError(f"pushing to {repo_id} needs a Hugging Face token: {LOGIN_HINT}.")
    return repo_id


def _fix(error: Exception) -> str:
    """What to do about a failed push: the credentials, offline mode, or the network and repo id."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, LocalTokenNotFoundError) or status in (401, 403):
        return LOGIN_HINT
    if isinstance(error, OfflineModeIsEnabled):
        return "unset HF_HUB_OFFLINE and run again"
    return "check the network and the repo id, then run again"


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add model with registers (retrofit)",
) -> str:
    """Upload an export folder to the Hub repo ``repo_id`` (created if needed); returns the commit URL.

    Every file of the folder is uploaded as it is, the model card included: export with ``repo_id`` for a
    card whose loading code names the Hub repo.
    """
    export_dir = Path(export_dir)
    check_repo(repo_id, token)
    if not is_export_dir(export_dir):
        raise RetrofitError(f"{export_dir} is not an export folder (no config.json): export the model first.")
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=export_dir, commit_message=commit_message)
    except Exception as e:  # network, HTTP and auth failures all end the same way: nothing pushed
        raise RetrofitError(
            f"could not push {export_dir} to {repo_id} ({type(e).__name__}: {first_line(e, 100)}): {_fix(e)}; "
            "the local export is kept."
        ) from e
    return str(getattr(commit, "commit_url", commit))
