"""Where downloaded files come from: the Hugging Face hub, or a local folder laid out like it.

A source serves the files of one dataset repo by their path inside the repo. Three operations:

- fetch(remote, staging): the whole file under staging (resumable: a transfer killed midway
  continues from the bytes already there);
- expected(remotes): the size and sha256 the source itself publishes per file ({} where it
  publishes none), so that a download is checked against more than its own header;
- open(remote): a binary stream of the file, for reading only its first lines.

`HubSource` is the only code that touches the network. `LocalSource` reads a folder holding one
subfolder per repo (`DIR/<owner>/<name>/...`, e.g. what `huggingface_hub.snapshot_download` writes
with local_dir=DIR/<owner>/<name>); `--hub-dir DIR` or PGOLF_HUB_DIR=DIR selects it, which is how
the tests (and an offline machine with a copied mirror) run the downloader without a network.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_DIR_ENV = "PGOLF_HUB_DIR"
OFFLINE_HINT = "check the network or use the embedded corpus (python -m data.embedded)"
COPY_CHUNK_BYTES = 8 << 20
# get_paths_info takes the paths in the query; keep each request small.
PATHS_PER_REQUEST = 50


def explain_hub_error(error: Exception, repo_id: str, filename: str) -> Exception | None:
    """One actionable RuntimeError for a hub failure, or None for an error that is not the hub's
    (the caller re-raises it untouched)."""
    kind = type(error).__name__
    names = {c.__name__ for c in type(error).__mro__}
    if (
        "LocalEntryNotFoundError" in names
        or isinstance(error, (ConnectionError, TimeoutError))
        or type(error).__module__.split(".")[0] in ("httpx", "requests", "urllib3")
    ):
        first = str(error).splitlines()[0] if str(error) else ""
        reason = first if isinstance(error, ConnectionError) and first else kind
        return RuntimeError(f"cannot reach the Hugging Face hub ({reason}): {OFFLINE_HINT}")
    if "EntryNotFoundError" in names:
        return RuntimeError(f"{repo_id}: {filename} not found on the hub (check --remote-prefix)")
    if "RepositoryNotFoundError" in names:
        return RuntimeError(
            f"{repo_id}: dataset repo not found or not accessible (check --repo-id)"
        )
    if "HfHubHTTPError" in names:
        first = str(error).strip().splitlines()[0] if str(error).strip() else kind
        return RuntimeError(f"{repo_id}: the hub refused {filename}: {first}")
    return None


def _check_resolvable() -> None:
    """Offline, the hub client retries for ~25 s before failing: resolve its name first. Behind a
    proxy the local resolver may not know the hub, so the check is skipped there."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(k) for k in proxies):
        return
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConnectionError(f"cannot resolve {host}: {e}") from None


class HubSource:
    """A dataset repo on the Hugging Face hub."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def describe(self) -> str:
        return f"hf://datasets/{self.repo_id}"

    def _call(self, what: str, action):
        try:
            _check_resolvable()
            return action()
        except Exception as e:  # classified; anything that is not the hub's is re-raised
            explained = explain_hub_error(e, self.repo_id, what)
            if explained is None:
                raise
            raise explained from None

    def fetch(self, remote: str, staging: Path) -> Path:
        """hf_hub_download into staging; the client resumes its own .incomplete file there."""
        from huggingface_hub import hf_hub_download

        def action():
            return hf_hub_download(
                repo_id=self.repo_id, filename=remote, repo_type="dataset", local_dir=staging
            )

        return Path(self._call(remote, action))

    def expected(self, remotes: list[str]) -> dict[str, dict]:
        """The hub's own size and (for LFS files, i.e. every shard) sha256 of each file."""
        from huggingface_hub import HfApi

        api = HfApi()
        out = {}
        for start in range(0, len(remotes), PATHS_PER_REQUEST):
            batch = remotes[start : start + PATHS_PER_REQUEST]
            infos = self._call(
                batch[0],
                lambda batch=batch: api.get_paths_info(self.repo_id, batch, repo_type="dataset"),
            )
            for info in infos:
                lfs = getattr(info, "lfs", None)
                size = getattr(info, "size", None)
                out[info.path] = {"size": size, "sha256": lfs.sha256 if lfs else None}
        return out

    def open(self, remote: str):
        from huggingface_hub import HfFileSystem

        path = f"datasets/{self.repo_id}/{remote}"
        return self._call(remote, lambda: HfFileSystem().open(path, "rb"))


class LocalSource:
    """A folder laid out like the hub: DIR/<owner>/<name>/<path in the repo>."""

    def __init__(self, hub_dir: str | os.PathLike, repo_id: str):
        self.repo_id = repo_id
        self.root = Path(hub_dir) / repo_id

    def describe(self) -> str:
        return str(self.root)

    def _path(self, remote: str) -> Path:
        path = self.root / remote
        if not path.is_file():
            raise RuntimeError(f"{path}: not found in the local hub folder ({HUB_DIR_ENV})")
        return path

    def fetch(self, remote: str, staging: Path) -> Path:
        """Copy into staging/remote through staging/remote.part, continuing a .part left by a
        killed run from its length (as the hub client resumes its .incomplete file)."""
        source = self._path(remote)
        dest = Path(staging) / remote
        part = dest.with_name(dest.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        done = part.stat().st_size if part.is_file() else 0
        if done > source.stat().st_size:  # not a prefix of this file: start again
            part.unlink()
            done = 0
        with open(source, "rb") as src, open(part, "ab") as out:
            src.seek(done)
            shutil.copyfileobj(src, out, COPY_CHUNK_BYTES)
        os.replace(part, dest)
        return dest

    def expected(self, remotes: list[str]) -> dict[str, dict]:
        """A local folder publishes no sizes or hashes of its own: nothing beyond the manifest."""
        return {}

    def open(self, remote: str):
        return open(self._path(remote), "rb")


def make_source(repo_id: str, hub_dir: str | os.PathLike | None = None):
    """LocalSource when hub_dir (or PGOLF_HUB_DIR) names a folder, else HubSource."""
    hub_dir = hub_dir or os.environ.get(HUB_DIR_ENV) or None
    if hub_dir is None:
        return HubSource(repo_id)
    if not Path(hub_dir).is_dir():
        raise ValueError(f"--hub-dir/{HUB_DIR_ENV}={str(hub_dir)!r}: not a directory")
    return LocalSource(hub_dir, repo_id)


def expected_shard_tokens(manifest: dict, entry: dict, name: str, train_shards: int):
    """([tokens of each val file], [tokens of each of the first train_shards train files]) that a
    dataset entry of an export manifest implies: shard_size tokens a file, the rest in the last
    one; None where the manifest does not say. ValueError for a train_shards the dataset (`name`
    in the message) does not have."""
    stats = entry.get("stats") or {}
    files_val = int(stats.get("files_val", 1))
    files_train = stats.get("files_train")
    if train_shards < 0:
        raise ValueError(f"--train-shards {train_shards}: must be >= 0")
    if files_train is not None and train_shards > int(files_train):
        raise ValueError(
            f"--train-shards {train_shards}: {name} has only {files_train} train shards"
        )
    shard_size = manifest.get("shard_size")

    def expected(i: int, files, tokens) -> int | None:
        if shard_size is None or files is None or tokens is None:
            return None
        if i < int(files) - 1:
            return int(shard_size)
        return int(tokens) - (int(files) - 1) * int(shard_size)

    val = [expected(i, files_val, stats.get("tokens_val")) for i in range(files_val)]
    train = [expected(i, files_train, stats.get("tokens_train")) for i in range(train_shards)]
    return val, train
