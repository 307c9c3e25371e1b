"""``hub.push``: a finished run's folder uploaded to a Hugging Face Hub repo through huggingface_hub, at the end of
training or later with ``difftune push FOLDER REPO_ID``.

The token is huggingface_hub's own (the HF_TOKEN environment variable or ``hf auth login``); it is never part of
the config, which is saved in the folder and uploaded. A failed upload leaves the local result as it was and says how
to push it later.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..errors import DifftuneError

#: what stays local: resumable training state (optimizer moments, RNG states) and the run's lock file
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", "*.lock", ".difftune*"]


def push_command(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """The command that pushes ``folder`` later."""
    return shlex.join(["difftune", "push", str(folder), repo_id, *(["--private"] if private else [])])


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (a finished run: README.md model card inside) to it;
    returns the commit URL. Any failure is a `DifftuneError` that names the repo, says the folder is intact and
    gives the command to push it later."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise DifftuneError(f"`folder` {str(folder)!r} holds no finished run (no README.md model card); push the "
                            "output_dir of a run that completed")
    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=IGNORE_PATTERNS,
                                 commit_message="Upload a difftune training result")
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as e:  # OfflineModeIsEnabled is a ConnectionError
        raise DifftuneError(
            f"uploading to the Hub repo {repo_id!r} failed ({type(e).__name__}: {str(e)[:300]}). The result is "
            f"intact in {folder.resolve()}. Hint: check the network, HF_HUB_OFFLINE and your token (HF_TOKEN or "
            f"`hf auth login`), then push it with: {push_command(folder, repo_id, private)}") from e
    return str(getattr(info, "commit_url", info))
