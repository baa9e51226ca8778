"""Local disk for storage.py: durable whole-file writes, and a walk that follows each link once.

Standard library only.
"""

import errno
import os

from vitpod.errors import UserError


def write_bytes(path: str, data: bytes) -> None:
    """Write through a temporary file, flushed and fsynced before the rename: readers (and a
    relaunch after a crash or power loss) see the old file or the new one, never half of it.
    A full disk or a read-only folder is one UserError naming the path; no temporary is left."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise write_error(path, e) from None


def write_error(path: str, e: OSError) -> UserError:
    """The one line for a write that the disk refused."""
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    if e.errno in (errno.EACCES, errno.EPERM):  # may be a read as well
        return UserError(f"permission denied on {path} ({name}); let this user read and write "
                         "it, then relaunch (a run resumes from its last checkpoint)")
    return UserError(f"cannot write {path}: {e.strerror or e}"
                     f"{f' ({name})' if name else ''}; free space on that disk or make it "
                     "writable, then relaunch (a run resumes from its last checkpoint)")


def ends_mid_line(path: str) -> bool:
    """Whether a text file's last line was cut short (a crash mid-append)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk(root: str, hidden: bool = True,
         outside: list | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """(relative path, real path) of every file below `root`, sorted, and the links not followed.

    One seen-set per walk, starting with `root` and its direct subfolders (an ImageFolder's
    class folders): a link whose target is inside one of them is not followed (its target is
    listed where it is), nor one whose target holds one of them (the root, an ancestor), nor a
    folder already walked. So a file reached by two paths is listed once and nothing loops.
    Broken and looping links are not followed either. `hidden=False` skips names starting
    with '.' at any depth. Given a list `outside`, the other links (to folders or files)
    whose target is outside the root are not followed but added to it, class folders too.
    """
    real_root = os.path.realpath(root)
    trees = [real_root] + sorted(
        os.path.realpath(e.path) for e in os.scandir(root) if e.is_dir()
        and (hidden or not e.name.startswith(".")))
    found, skipped = [], []
    seen_dirs, seen_files = set(), set()

    def linked_into_trees(target: str) -> bool:
        return any(_inside(target, t) or _inside(t, target) for t in trees)

    def visit(path: str, real: str, rel: str) -> None:
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:  # unreadable: named with the links not followed
            skipped.append(rel or ".")
            return
        for entry in entries:
            if not hidden and entry.name.startswith("."):
                continue
            rel_entry = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                is_dir, is_file = os.path.isdir(target), os.path.isfile(target)
                # a class folder that is a link to a folder outside the root is walked
                top_level_class = (path == root and target in trees
                                   and not _inside(target, real_root))
                if (not (is_dir or is_file) or (linked_into_trees(target) and not top_level_class)
                        or target in seen_dirs or target in seen_files):
                    skipped.append(rel_entry)
                    continue
                if outside is not None and not _inside(target, real_root):
                    outside.append(rel_entry)
                    continue
                if is_dir:
                    visit(entry.path, target, rel_entry)
                else:
                    seen_files.add(target)
                    found.append((rel_entry, target))
            elif entry.is_dir():
                visit(entry.path, os.path.join(real, entry.name), rel_entry)
            else:
                file_real = os.path.join(real, entry.name)
                if file_real not in seen_files:
                    seen_files.add(file_real)
                    found.append((rel_entry, file_real))

    visit(root, real_root, "")
    return sorted(found), skipped
