"""The least a Python program can do for a no-op re-sync of a folder, for
bench/dicom_folder.py:

    python bench/python_floor.py TREE COPY

What rsync's no-op does, and nothing more: walk TREE, and for each file compare its
size and modification time with those of the same path under COPY (two ``stat`` calls a
file). No lock, no manifest, no listing cache, no check of DICOM headers, nothing
written, only the standard library's ``os`` imported. Prints the number of files and
the number found unchanged; exits 1 if a file differs or is missing in COPY.

It is not a sync tool: it is the floor under any tool written in Python on this machine
(interpreter start, the walk and the ``stat`` calls), measured beside rsync in the same
run, so that the native engine's no-op can be judged against what Python itself costs.
"""

import os
import sys


def walk(top: str, out: list) -> None:
    with os.scandir(top) as found:
        for entry in found:
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, out)
            else:
                out.append(entry.path)


def main(tree: str, copy: str) -> int:
    files: list = []
    walk(tree, files)
    skip, same = len(tree), 0
    for path in files:
        mine = os.stat(path)
        try:
            theirs = os.stat(copy + path[skip:])
        except OSError:
            continue
        same += mine.st_size == theirs.st_size and mine.st_mtime_ns == theirs.st_mtime_ns
    print(len(files), same)
    return 0 if same == len(files) else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/")))
