"""Listing an ImageFolder split so that a hostile tree can neither hang, explode nor mislabel it.

torchvision's ``make_dataset`` walks each class folder with ``os.walk(followlinks=True)`` and keeps every
name with an image extension. A directory link to ``.`` or ``..`` then repeats the tree until the path
length runs out (36 images became 11,316, images of other classes among them), and a FIFO named ``x.png``
is listed and later blocks the loader that opens it. :func:`list_split` lists the same samples in the same
order for an ordinary tree, and otherwise:

- follows each real directory once: a directory link that leads to a folder already listed, to its own or
  another class folder, or above the class folders (to the split or one of its ancestors) is not followed;
- keeps only regular files: a FIFO, socket or device, a dangling link or a link loop with an image name is
  left out and reported (it is never opened);
- keeps names as the file system gives them (``str`` with Python's surrogate escapes where a name is not
  UTF-8, ``os.fsencode`` gives back its bytes); they are written through ``imageio.display_path``.

Directory identity is the resolved path (``os.path.realpath``), computed only for directory links: a real
subdirectory's resolved path is its parent's plus its name, so an ordinary tree costs no extra system call.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from scan_zoo.data.imageio import file_kind


@dataclass
class Listing:
    """What :func:`list_split` found: ``samples`` (path, class index) in torchvision's order; ``skipped``
    (path, reason) for names with an image extension that are not regular files; ``unfollowed`` (path, reason)
    for directories not listed."""

    samples: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    unfollowed: list = field(default_factory=list)


def why_not_regular(path: str) -> str:
    """Why ``path``, which is not a regular file, is left out: "a FIFO, not a regular file", "a dangling link", ..."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a dangling symbolic link"
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
    return f"{file_kind(st.st_mode)}, not a regular file"


def _owner(real: str, class_reals: dict) -> str | None:
    """The class whose folder holds ``real`` (the nearest one above it, or itself), or None."""
    p = real
    while True:
        if p in class_reals:
            return class_reals[p]
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _refuse_link(real: str, own: str, class_reals: dict, ancestors: set, visited: set) -> str | None:
    """Why the directory link resolving to ``real`` inside class ``own`` is not followed, or None to follow it."""
    if real in ancestors:
        return "leads to the split folder or above it"
    owner = _owner(real, class_reals)
    if owner == own:
        return "leads back into its own class folder"
    if owner is not None:
        return f"leads into the folder of class {owner}"
    if real in visited:
        return "leads to a folder listed already"
    return None


def _walk_class(
    top: str, own: str, class_reals: dict, ancestors: set, visited: set, extensions: tuple, out: Listing
) -> list:
    """``[(directory, [file names])]`` of class ``own`` rooted at ``top``, each real directory once."""
    found = []
    stack = [(top, os.path.realpath(top))]
    while stack:
        d, real = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # os.walk skips these silently; say so
            out.unfollowed.append((d, f"cannot be listed: {e.strerror}"))
            continue
        files, subdirs = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links; d_type answers without a system call for the rest
            except OSError:
                is_dir = False
            if is_dir:
                if e.is_symlink():
                    sub_real = os.path.realpath(e.path)
                    reason = _refuse_link(sub_real, own, class_reals, ancestors, visited)
                else:
                    sub_real = os.path.join(real, e.name)
                    reason = (
                        "is the folder of another class"
                        if sub_real in class_reals
                        else "leads to a folder listed already"
                        if sub_real in visited
                        else None
                    )
                if reason:
                    out.unfollowed.append((e.path, reason))
                    continue
                visited.add(sub_real)
                subdirs.append((e.path, sub_real))
            elif e.name.lower().endswith(extensions):
                try:
                    regular = e.is_file()
                except OSError:
                    regular = False
                if regular:
                    files.append(e.name)
                else:
                    out.skipped.append((e.path, why_not_regular(e.path)))
        found.append((d, files))
        stack.extend(reversed(subdirs))
    return found


def list_split(directory: str, class_to_idx: dict, extensions: tuple = IMG_EXTENSIONS) -> Listing:
    """The samples of an ImageFolder split ``directory`` whose classes are ``class_to_idx``, listed safely.

    For a tree of real folders and regular files the result equals torchvision's ``make_dataset``: classes in
    sorted order, within a class every directory by sorted path and its files by sorted name."""
    directory = os.path.expanduser(str(directory))
    out = Listing()
    tops = {c: os.path.join(directory, c) for c in sorted(class_to_idx) if os.path.isdir(os.path.join(directory, c))}
    class_reals: dict = {}
    for c, top in tops.items():
        class_reals.setdefault(os.path.realpath(top), c)
    ancestors = {os.path.realpath(directory)}
    for real in class_reals:
        p = os.path.dirname(real)
        while p not in ancestors:
            ancestors.add(p)
            p = os.path.dirname(p)
    ancestors -= set(class_reals)  # a class folder inside another: its own folder is not "above" it
    visited = set(class_reals)
    extensions = tuple(x.lower() for x in extensions)
    for c, top in tops.items():
        real = os.path.realpath(top)
        if class_reals[real] != c:
            out.unfollowed.append((top, f"is the same folder as class {class_reals[real]}"))
            continue
        for d, files in sorted(_walk_class(top, c, class_reals, ancestors, visited, extensions, out)):
            out.samples.extend((os.path.join(d, f), class_to_idx[c]) for f in sorted(files))
    return out


class SafeImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder listed by :func:`list_split`; ``skipped`` and ``unfollowed`` say what was left
    out (see :class:`Listing`)."""

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        if is_valid_file is not None:
            raise ValueError("SafeImageFolder selects files by extension only")
        listing = list_split(directory, class_to_idx, extensions or IMG_EXTENSIONS)
        self.skipped, self.unfollowed = listing.skipped, listing.unfollowed
        if not allow_empty and len({t for _, t in listing.samples}) < len(class_to_idx):
            raise FileNotFoundError(f"some classes of {directory} hold no image")
        return listing.samples
