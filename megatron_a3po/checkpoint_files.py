"""The on-disk protocol of a checkpoint directory: crash-safe commit, `latest`, completeness, retention.

Plain files only (no torch): a process killed at any instant of a save leaves a directory from which
`find_resumable` returns a complete checkpoint, never a partial one.

    DIR/.tmp_step_N/   being written by every rank; its marker (with a manifest of every file and its size) is
                       written last, after all ranks' files are fsynced
    DIR/step_N/        committed: the marker is present and every file of its manifest exists with its size
    DIR/.old_step_N/   a previous step_N set aside while its replacement is renamed in (exists for an instant)
    DIR/latest         the name of the newest committed step dir, swapped atomically

Commit order: new dir complete and fsynced -> an existing step_N renamed aside -> new dir renamed in ->
`latest` swapped (tmp file, fsync, rename, fsync dir) -> the aside dir removed. Removal (retention, aside)
deletes the marker first, so a half-removed dir can never pass for complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

MARKER = "a3po_train_state.json"
LATEST = "latest"
TMP_PREFIX, OLD_PREFIX, STEP_PREFIX = ".tmp_", ".old_", "step_"
KILL_POINT_ENV = "A3PO_TEST_KILL_AT"  # fault-injection hook: SIGKILL this process at the named point


def kill_point(name: str) -> None:
    """Test hook: die here (SIGKILL, no clean-up) when A3PO_TEST_KILL_AT names this point."""
    if os.environ.get(KILL_POINT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (those written on this node; others are no-ops)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def write_durably(path: Path, text: str) -> None:
    """Replace `path` atomically: write a temp file, fsync it, rename it over, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def manifest(root: Path) -> dict[str, int]:
    """{relative path: size} of every file under `root` except the marker."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER}


def problems(ckpt: Path) -> list[str]:
    """Why `ckpt` is not a complete checkpoint ([] when it is). Checkpoints without a manifest (written before
    manifests existed) count as complete when their marker is readable."""
    try:
        state = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError) as err:
        return [f"no readable marker {MARKER} ({type(err).__name__})"]
    missing = []
    for name, size in state.get("manifest", {}).items():
        path = ckpt / name
        if not path.is_file():
            missing.append(f"{name} missing")
        elif path.stat().st_size != size:
            missing.append(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
    return missing


def commit(tmp: Path, final: Path, state: dict) -> None:
    """Make `tmp` (every rank's files written) the committed checkpoint `final` and point `latest` at it."""
    fsync_tree(tmp)
    kill_point("before_marker")
    write_durably(tmp / MARKER, json.dumps({**state, "manifest": manifest(tmp)}, indent=2, default=str) + "\n")
    kill_point("after_marker")
    aside = replace_dir(tmp, final)
    write_durably(final.parent / LATEST, final.name + "\n")
    kill_point("after_latest")
    remove(aside)


def replace_dir(new: Path, target: Path) -> Path:
    """target := new, crash-safe: `new` fsynced, an existing `target` renamed aside, `new` renamed in, the
    parent fsynced. Returns the aside path, for the caller to remove once nothing refers to it any more."""
    fsync_tree(new)
    aside = target.with_name(OLD_PREFIX + target.name)
    if target.exists():
        remove(aside)
        os.replace(target, aside)
        kill_point("after_aside")
    os.replace(new, target)
    fsync_path(target.parent)
    kill_point("after_rename")
    return aside


def remove(ckpt: Path) -> None:
    """Delete a checkpoint dir, marker first (a half-deleted dir is then plainly incomplete)."""
    if not ckpt.exists():
        return
    (ckpt / MARKER).unlink(missing_ok=True)
    fsync_path(ckpt)
    shutil.rmtree(ckpt)


def committed_steps(save_dir: Path) -> dict[int, Path]:
    """step -> dir of every step_* and .old_step_* dir with a marker (complete or not), newest name wins."""
    found: dict[int, Path] = {}
    for prefix in (OLD_PREFIX + STEP_PREFIX, STEP_PREFIX):  # step_N overrides .old_step_N
        for path in save_dir.glob(prefix + "*"):
            digits = path.name[len(prefix):]
            if digits.isdigit() and (path / MARKER).exists():
                found[int(digits)] = path
    return found


def find_resumable(save_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from in a --save dir: the one `latest` names if complete, else the newest
    complete one (a warning says so). (None, warnings) when there is none."""
    warnings = []
    named = (save_dir / LATEST).read_text().strip() if (save_dir / LATEST).is_file() else None
    candidates = sorted(committed_steps(save_dir).items(), reverse=True)
    if named:
        preferred = [save_dir / named, save_dir / f"{OLD_PREFIX}{named}"]
        for path in preferred:
            if path.is_dir() and not problems(path):
                return path, warnings
        why = problems(save_dir / named) if (save_dir / named).is_dir() else ["missing"]
        warnings.append(f"{save_dir / LATEST} names {named!r}, which is not a complete training checkpoint "
                        f"({'; '.join(why[:3])})")
    elif candidates:
        warnings.append(f"{save_dir} has no `{LATEST}` file (a save was interrupted before writing it)")
    for _, path in candidates:
        issues = problems(path)
        if not issues:
            if warnings:
                warnings.append(f"resuming from the newest complete checkpoint instead: {path}")
            return path, warnings
        warnings.append(f"{path}: incomplete ({'; '.join(issues[:3])})")
    return None, warnings


def clean_stale(save_dir: Path, keep: Path | None = None) -> list[str]:
    """Remove leftovers of interrupted saves (.tmp_* other than `keep`); restore an .old_step_N whose step_N is
    gone, drop one whose step_N is complete. Returns what was done (rank 0, under the run's lock)."""
    done = []
    for path in sorted(save_dir.glob(TMP_PREFIX + "*")):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed the interrupted save {path.name}")
    for aside in sorted(save_dir.glob(OLD_PREFIX + STEP_PREFIX + "*")):
        final = save_dir / aside.name[len(OLD_PREFIX):]
        if final.is_dir() and not problems(final):
            remove(aside)
        elif not final.exists() and not problems(aside):
            os.replace(aside, final)
            fsync_path(save_dir)
            done.append(f"restored {final.name} from {aside.name}")
    return done


def retain(save_dir: Path, keep_last: int, keep_interval: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep_last` (0: keep all), except every
    `keep_interval`-th step and the one `latest` names. Returns the removed dirs."""
    if keep_last <= 0:
        return []
    steps = sorted(committed_steps(save_dir).items(), reverse=True)
    latest = (save_dir / LATEST).read_text().strip() if (save_dir / LATEST).is_file() else None
    removed = []
    for rank, (step, path) in enumerate(steps):
        if rank < keep_last or (keep_interval and step % keep_interval == 0) or path.name == latest:
            continue
        remove(path)
        removed.append(path)
    return removed


def free_bytes(path: Path) -> int:
    """Free space where `path` lives (A3PO_TEST_FREE_BYTES overrides it: the full-disk fault test)."""
    override = os.environ.get("A3PO_TEST_FREE_BYTES")
    if override is not None:
        return int(override)
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
