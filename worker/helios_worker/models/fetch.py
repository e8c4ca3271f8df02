"""Download an hf:// model into a folder once: what the worker pod's `fetch-model` init container runs.

`python -m helios_worker.models.fetch ORG/NAME FOLDER`. The folder's parent may be shared by every
pod of a HeliosDeployment (a ReadWriteMany claim): a lock file serialises the pods that start
together, and a marker written only after a complete download lets every later pod (a new replica,
a switch, a profiling round) start without asking the hub at all, even when the hub is unreachable
then. A download cut short leaves no marker; the next try resumes it (snapshot_download keeps its
per-file metadata in the folder). To take a newer revision, delete the folder.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETE = ".helios-complete"  # written last: the folder holds the whole snapshot


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch(repo: str, folder: Path) -> bool:
    """Make `folder` hold the hub's snapshot of `repo`; False when it already did (nothing fetched)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{folder.name}.lock"):
        if (folder / COMPLETE).is_file():
            return False
        from huggingface_hub import snapshot_download  # only here: a complete folder needs no hub client

        snapshot_download(repo, local_dir=folder)
        marker = folder / f"{COMPLETE}.partial"
        marker.write_text(json.dumps({"repo": repo, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        marker.rename(folder / COMPLETE)
        return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m helios_worker.models.fetch ORG/NAME FOLDER", file=sys.stderr)
        return 2
    repo, folder = args[0], Path(args[1])
    try:
        fetched = fetch(repo, folder)
    except Exception as err:  # one line the operator reports (Degraded=WorkerFailed), whatever the hub said
        detail = " ".join(str(err).split())
        print(f"fetch-model: error: {repo}: {type(err).__name__}: {detail}"[:1000], file=sys.stderr, flush=True)
        return 1
    print(f"fetch-model: {repo} {'downloaded into' if fetched else 'already complete in'} {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
