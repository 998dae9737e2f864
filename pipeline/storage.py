"""Where inputs and outputs live: local paths, or any filesystem pyarrow understands.

    data/input.parquet                                    a local path
    s3://bucket/exports/   gs://bucket/x.parquet          object stores
    hdfs://namenode:8020/data/                            HDFS
    s3://bucket/x.parquet?endpoint_override=host:9000&scheme=http     S3-compatible (MinIO)

Every stage reads and writes through these few functions, so the engines never care
which it is. Credentials come from the usual places (AWS_* variables, instance roles,
GOOGLE_APPLICATION_CREDENTIALS, ...), as pyarrow finds them. Object stores have no
rename: a "move" there is a server-side copy, which makes the object appear whole or
not at all, and that is all the output's atomicity needs.
"""

from __future__ import annotations

import functools
import glob
import os
import posixpath
import re
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from .errors import UsageError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_LOCAL = pafs.LocalFileSystem()


def is_uri(spec: str) -> bool:
    """True for scheme://... specs other than file://, which is just a local path."""
    return bool(_SCHEME.match(spec)) and not spec.startswith("file://")


def _local_path(spec: str) -> str:
    return spec[len("file://"):] if spec.startswith("file://") else spec


@functools.lru_cache(maxsize=None)
def _root_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    # One filesystem object per bucket or host (creating one can cost a network round trip).
    try:
        return pafs.FileSystem.from_uri(root)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cannot open {root}: {e}. Check the name, the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, "
            "...) and the network; for an S3-compatible store set AWS_ENDPOINT_URL_S3 or add "
            "?endpoint_override=host:port&scheme=http to the URI") from None


def locate(spec: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `spec` and the path within it."""
    if not is_uri(spec):
        return _LOCAL, os.path.abspath(_local_path(spec))
    u = urlsplit(spec)
    fs, root_path = _root_filesystem(urlunsplit((u.scheme, u.netloc, "", u.query, "")))
    rest = u.path.strip("/")
    if not rest:
        return fs, root_path
    if root_path in ("", "/"):  # hdfs://host:port/... : the path is absolute on that host
        return fs, root_path + rest
    return fs, root_path.rstrip("/") + "/" + rest  # s3://bucket/key: "bucket/key"


def join(spec: str, *names: str) -> str:
    """`spec`/name..., keeping a URI's query (endpoint options) at the end."""
    if not is_uri(spec):
        return os.path.join(spec, *names)
    u = urlsplit(spec)
    return urlunsplit((u.scheme, u.netloc, posixpath.join(u.path or "/", *names), u.query, ""))


def with_suffix(spec: str, suffix: str) -> str:
    """`spec` with `suffix` appended to its last component: answers.parquet -> answers.parquet.partial."""
    if not is_uri(spec):
        return without_trailing_slash(spec) + suffix
    u = urlsplit(spec)
    return urlunsplit((u.scheme, u.netloc, u.path.rstrip("/") + suffix, u.query, ""))


def parent(spec: str) -> str:
    if not is_uri(spec):
        return os.path.dirname(os.path.abspath(_local_path(spec)))
    u = urlsplit(spec)
    return urlunsplit((u.scheme, u.netloc, posixpath.dirname(u.path.rstrip("/")), u.query, ""))


def basename(spec: str) -> str:
    return posixpath.basename(urlsplit(spec).path.rstrip("/")) if is_uri(spec) else os.path.basename(spec)


def info(spec: str) -> pafs.FileInfo:
    fs, path = locate(spec)
    return fs.get_file_info(path)


def is_file(spec: str) -> bool:
    return info(spec).type == pafs.FileType.File


def is_dir(spec: str) -> bool:
    return info(spec).type == pafs.FileType.Directory


def exists(spec: str) -> bool:
    return info(spec).type != pafs.FileType.NotFound


def identity(spec: str) -> str:
    """A name that is the same for the same file however it was written (for duplicates, fingerprints)."""
    return spec if is_uri(spec) else os.path.realpath(_local_path(spec))


def within(inner: str, outer: str) -> bool:
    """Is `inner` the same path as `outer`, or below it? (Local paths with links resolved; URIs
    on the same bucket or host. Neither needs to exist.)"""
    def key(spec: str) -> str:
        if is_uri(spec):
            u = urlsplit(spec)
            return f"{u.scheme}://{u.netloc}/{u.path.strip('/')}"
        return os.path.realpath(_local_path(spec))

    a, b = key(inner), key(outer)
    return a == b or a.startswith(b.rstrip("/") + "/")


def list_files(spec: str) -> list[str]:
    """Every file below a directory, as specs of the same kind as `spec`, sorted."""
    fs, path = locate(spec)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for f in found:
        if f.type != pafs.FileType.File:
            continue
        rel = f.path[len(path.rstrip("/")) + 1:] if f.path.startswith(path.rstrip("/") + "/") else f.base_name
        out.append(join(spec, *rel.split("/")))
    return sorted(out)


def relative(directory: str, file: str) -> str:
    """`file`'s path below `directory`, '/'-separated."""
    if is_uri(file):
        return urlsplit(file).path[len(urlsplit(directory).path.rstrip("/")) + 1:]
    return os.path.relpath(file, directory).replace(os.sep, "/")


def is_glob(spec: str) -> bool:
    """Does `spec` hold glob characters in its path (a URI's ?endpoint_override=... query is not one)?"""
    return glob.has_magic(urlsplit(spec).path if is_uri(spec) else _local_path(spec))


def glob_root(pattern: str) -> str:
    """The folder a glob reads below: its components before the first with glob characters."""
    if is_uri(pattern):
        u = urlsplit(pattern)
        parts = u.path.split("/")
        fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
        return urlunsplit((u.scheme, u.netloc, "/".join(parts[:fixed]) or "/", u.query, ""))
    parts = os.path.abspath(_local_path(pattern)).split(os.sep)
    fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    return os.sep.join(parts[:fixed]) or os.sep


def glob_could_match(pattern: str, path: str) -> bool:
    """Would a glob match `path` (which need not exist)?"""
    root = glob_root(pattern)
    if not within(path, root):
        return False
    if is_uri(pattern):
        rest = urlsplit(pattern).path[len(urlsplit(root).path.rstrip("/")) + 1:]
        rel = relative(root, path)
    else:
        rest = os.path.abspath(_local_path(pattern))[len(root.rstrip(os.sep)) + 1:]
        rel = os.path.relpath(os.path.abspath(_local_path(path)), root)
    return re.fullmatch(_glob_regex(rest.replace(os.sep, "/")), rel.replace(os.sep, "/")) is not None


def without_trailing_slash(spec: str) -> str:
    """`out/` -> `out`, `s3://b/out/` -> `s3://b/out`: one name for one place."""
    if not is_uri(spec):
        stripped = spec.rstrip("/")
        return stripped or spec
    u = urlsplit(spec)
    return urlunsplit((u.scheme, u.netloc, u.path.rstrip("/"), u.query, ""))


def glob_files(pattern: str) -> list[str]:
    """Files matching a glob (*, ?, [..], ** across folders), sorted."""
    if not is_uri(pattern):
        return sorted(p for p in glob.glob(_local_path(pattern), recursive=True) if os.path.isfile(p))
    base = glob_root(pattern)
    regex = re.compile(_glob_regex(urlsplit(pattern).path[len(urlsplit(base).path.rstrip("/")) + 1:]))
    return [f for f in (list_files(base) if exists(base) else []) if regex.fullmatch(relative(base, f))]


def _glob_regex(pattern: str) -> str:
    """A glob as a regex over '/'-separated paths: * ? [..] stay within a folder, ** spans folders."""
    out = []
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, piece = 0, ""
        while j < len(part):
            c = part[j]
            if c == "*":
                piece += "[^/]*"
            elif c == "?":
                piece += "[^/]"
            elif c == "[" and part.find("]", j + 2) != -1:
                k = part.find("]", j + 2)
                body = part[j + 1:k]
                piece += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                j = k
            else:
                piece += re.escape(c)
            j += 1
        out.append(piece + ("" if last else "/"))
    return "".join(out)


def read_table(spec: str, **options):
    """A Parquet file, or a directory of them (an --engine ray output), as one Arrow table;
    `options` go to pyarrow.parquet.read_table (columns=, schema=)."""
    import pyarrow.parquet as pq

    fs, path = locate(spec)
    return pq.read_table(path, filesystem=fs, **options)


def read_bytes(spec: str) -> bytes:
    fs, path = locate(spec)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(spec: str, data: bytes) -> None:
    fs, path = locate(spec)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_bytes_atomic(spec: str, data: bytes) -> None:
    """Write to a temporary name, then move into place: readers see all of it or nothing."""
    write_bytes(with_suffix(spec, ".tmp"), data)
    sync(with_suffix(spec, ".tmp"))
    move(with_suffix(spec, ".tmp"), spec)


def sync(spec: str) -> None:
    """Force a local file's bytes to disk (before it is renamed into place: after a power loss a
    renamed file must not turn out truncated). Object stores write an object whole: nothing to do."""
    if is_uri(spec):
        return
    fd = os.open(_local_path(spec), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move(src: str, dst: str) -> None:
    """Rename (a server-side copy on object stores); locally the rename itself is made durable."""
    fs, a = locate(src)
    _, b = locate(dst)
    fs.move(a, b)
    if not is_uri(dst):
        fd = os.open(os.path.dirname(b) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)  # the directory entry
        finally:
            os.close(fd)


def copy(src: str, dst: str) -> None:
    """Copy a file (server-side on object stores)."""
    fs, a = locate(src)
    _, b = locate(dst)
    fs.copy_file(a, b)


def renames_dirs(spec: str) -> bool:
    """Does the filesystem holding `spec` rename a directory in one step (local disks, HDFS)?
    Object stores do not: there a "directory" is a prefix of many objects."""
    fs, _ = locate(spec)
    return isinstance(fs, (pafs.LocalFileSystem, pafs.HadoopFileSystem))


def make_dirs(spec: str) -> None:
    fs, path = locate(spec)
    fs.create_dir(path, recursive=True)


def delete_file(spec: str) -> None:
    fs, path = locate(spec)
    fs.delete_file(path)


def delete_dir(spec: str) -> None:
    """Remove a directory tree; one that is not there is fine."""
    fs, path = locate(spec)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def delete(spec: str) -> None:
    """Remove a file or a directory tree, if there is one."""
    kind = info(spec).type
    if kind == pafs.FileType.Directory:
        delete_dir(spec)
    elif kind == pafs.FileType.File:
        delete_file(spec)
