"""Writing an artifact directory atomically, with every output problem found before the slow work.

    with staged_output(Path("out/fp32"), overwrite=False) as stage:   # checks, then creates the staging dir
        stage.check_space(estimated_bytes)                           # once the model's size is known
        ... write into stage.directory (the draft/ too), use stage.scratch for temporary files ...
    # success: stage.directory replaces out/fp32 in one rename; any error, SIGINT or SIGTERM: it is removed

The staging directory is a hidden sibling, `.NAME.staging-PID`, so the rename stays on one filesystem. A run
killed with SIGKILL leaves it behind; the next run into the same parent directory removes every staging or
replaced-artifact leftover whose process is gone. Scratch files live inside the staging directory, never in
$TMPDIR, so nothing else is left to find.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from onnxlm.artifact import is_artifact
from onnxlm.errors import OnnxlmError

SCRATCH = ".scratch"
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:staging|old)-(?P<pid>\d+)")


def check_output(output: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an output that exists and is not an artifact we were told to replace."""
    if output.exists() and not output.is_dir():
        raise OnnxlmError(f"output {output} exists and is not a directory")
    ancestor = next(p for p in [output, *output.absolute().parents] if p.exists())
    if not ancestor.is_dir():
        raise OnnxlmError(f"cannot create the output {output}: {ancestor} is a file, not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not is_artifact(output):
            raise OnnxlmError(f"output directory {output} exists, is not empty and is not an onnxlm artifact")
        if not overwrite:
            raise OnnxlmError(f"output {output} already holds an artifact: pass --overwrite (API: overwrite=True) "
                              "to replace it")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_leftovers(parent: Path) -> list[Path]:
    """Remove staging and replaced-artifact directories in `parent` left by processes that no longer run."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = LEFTOVER.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


class Stage:
    """A staging directory for one artifact; `scratch` is for temporary files and never reaches the artifact."""

    def __init__(self, output: Path, directory: Path):
        self.output, self.directory = output, directory
        self.scratch = directory / SCRATCH

    def check_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.directory).free
        if needed_bytes > free:
            raise OnnxlmError(f"not enough free space for {self.output}: about {needed_bytes / 1e6:.0f} MB needed "
                              f"(artifact and scratch), {free / 1e6:.0f} MB free")


@contextlib.contextmanager
def staged_output(output: Path, overwrite: bool = False) -> Iterator[Stage]:
    """Yield a Stage; on success its directory replaces `output` in one rename, on any error it is removed."""
    output = Path(output)
    check_output(output, overwrite)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(output.parent)
        staging = output.parent / f".{output.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / SCRATCH).mkdir()
    except OSError as exc:
        raise OnnxlmError(f"cannot write the output {output}: {exc.strerror or exc}") from None
    stage = Stage(output, staging)
    try:
        yield stage
        shutil.rmtree(stage.scratch)
        check_output(output, overwrite)  # another process may have written there meanwhile
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        if output.exists():
            output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if is_write_error(exc, staging):  # a full disk, a read-only mount: one line, nothing left behind
            raise OnnxlmError(f"cannot write the output {output}: {exc.strerror or exc}") from None
        raise


def is_write_error(exc: BaseException, staging: Path) -> bool:
    """An OSError from writing the artifact (not from reading the source, which is reported as such)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG) or str(exc.filename or "").startswith(
        str(staging))
