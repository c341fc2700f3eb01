"""A file reader confined to one folder: the agent's ``read_file`` tool.

    reader = FileReader("notes/")
    reader.read("todo.md")            # the text (at most max_chars characters)
    reader.read("../secret.txt")      # ToolError: '..' is not allowed
    reader.tool()                     # a Tool whose path argument is one of the folder's files

Confinement does not trust the path's spelling: absolute paths, ``~`` and any ``..`` part are refused outright,
then the path is resolved with every symbolic link followed (``os.path.realpath``) and must still lie inside the
folder, so a link that points out is refused too. The file is opened with ``O_NOFOLLOW`` and checked on the open
descriptor (a regular file, the same one that was resolved), so swapping a link in between does not help. Only
UTF-8 text is returned.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scratchlm.errors import ConfigError
from scratchlm.function_schema import ToolError

MAX_CHARS = 8000  # characters returned to the model (SmolLM2's whole context is 8,192 tokens)
LIST_LIMIT = 50  # up to this many files, the tool's schema names them (the model can only pick a real one)


class FileReader:
    """Reads text files under ``root`` and nowhere else."""

    def __init__(self, root: str | os.PathLike, max_chars: int = MAX_CHARS):
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--root {root} is not a folder: give the folder whose files the agent may read")
        self.root = Path(os.path.realpath(path))
        self.max_chars = max_chars

    def resolve(self, path: str) -> Path:
        """The real path of ``path`` (relative to the root), or a ToolError when it is not inside the root."""
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            raise ToolError("give a file path relative to the folder, e.g. notes.txt")
        parts = path.replace("\\", "/").split("/")
        if path.startswith(("/", "\\", "~")) or os.path.isabs(path) or (len(path) > 1 and path[1] == ":"):
            raise ToolError(f"{path!r} is an absolute path: give a path relative to the folder")
        if ".." in parts:
            raise ToolError(f"{path!r} contains '..': only files inside the folder can be read")
        real = Path(os.path.realpath(self.root / path))
        if real != self.root and self.root not in real.parents:
            raise ToolError(f"{path!r} leads outside the folder (a symbolic link): it cannot be read")
        return real

    def read(self, path: str) -> str:
        """The text of the file at ``path`` under the root, cut at ``max_chars`` characters (with a note)."""
        real = self.resolve(path)
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise ToolError(f"no file {path!r} in the folder") from None
        except OSError as exc:
            raise ToolError(f"cannot open {path!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)  # checked on the open descriptor: what was opened is what is read
            if not stat.S_ISREG(info.st_mode):
                raise ToolError(f"{path!r} is not a regular file")
            current = os.stat(real, follow_symlinks=False)
            if (info.st_dev, info.st_ino) != (current.st_dev, current.st_ino):
                raise ToolError(f"{path!r} changed while it was opened: try again")
            data = os.read(fd, self.max_chars * 4 + 4)  # UTF-8 takes at most 4 bytes a character
        finally:
            os.close(fd)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:  # not just a character cut at the read's end
                raise ToolError(f"{path!r} is not UTF-8 text") from None
            text = data[:exc.start].decode("utf-8")
        if len(text) > self.max_chars or info.st_size > len(data):
            return text[:self.max_chars] + f"\n[... cut: the file has {info.st_size:,} bytes]"
        return text

    def files(self, limit: int = LIST_LIMIT + 1) -> list[str]:
        """Up to ``limit`` readable files under the root, as relative paths in sorted order."""
        found = []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(folder, name), self.root)
                try:
                    if self.resolve(rel).is_file():
                        found.append(rel.replace(os.sep, "/"))
                except ToolError:
                    continue  # a link out of the folder
                if len(found) >= limit:
                    return found
        return found

    def tool(self):
        """The ``read_file`` tool. With at most ``LIST_LIMIT`` files its ``path`` is an enum of them, so a
        constrained call always names a file that exists."""
        from scratchlm.tools import Tool

        files = self.files()
        path = {"type": "string", "description": "a path relative to the folder"}
        description = "Read a text file from the folder the user allowed."
        if files and len(files) <= LIST_LIMIT:
            path = {"type": "string", "enum": files}
            description += " Files: " + ", ".join(files) + "."
        schema = {"type": "object", "properties": {"path": path}, "required": ["path"], "additionalProperties": False}
        return Tool("read_file", description, schema, function=self.read)
