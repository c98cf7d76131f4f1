"""Fetch a model archive from an allowed http(s) URL into the model store. Event loop only.

Only URLs matching one of `allowed_urls` (full match) are fetched; the body is bounded by
`max_archive_expanded_size` and the whole download by `download_timeout`. The file is written
under a temporary name of its own in the store (two downloads of one file name never share
it) and linked under the URL's own file name when complete, which must be a plain archive
name: a URL never chooses a path outside the store, and never replaces a file already there.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tsctl.errors import BadRequest, Conflict, TsctlError
from tsctl.server.config import ServerConfig

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\.(mar|tar\.gz|tgz|zip)$")


class DownloadFailed(TsctlError):
    http_status = 400
    type_name = "DownloadArchiveException"


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def check_allowed(config: ServerConfig, url: str) -> None:
    """TorchServe's rules: no `..` segment in the URL's path (whatever the patterns say), and
    the whole URL must match one `allowed_urls` pattern."""
    if ".." in urlsplit(url).path.split("/"):
        raise BadRequest(f"Relative path is not allowed in url: {url}")
    if not any(re.fullmatch(pattern, url) for pattern in config.allowed_urls):
        raise BadRequest(f"model url {url!r} is not allowed: it matches no pattern in allowed_urls")


async def fetch(config: ServerConfig, url: str) -> str:
    """Download `url` into the model store; returns the file name to register."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    check_allowed(config, url)
    store = config.model_store
    if store is None:
        raise BadRequest("there is no model store to download into")
    name = unquote(Path(urlsplit(url).path).name)
    if not _SAFE_NAME.match(name):
        raise BadRequest(f"model url {url!r} must end in an archive file name such as model.mar")
    target = store / name
    if target.exists():
        raise Conflict(f"Model file already exists: {name}")
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".download", dir=store)
    partial = Path(temporary)
    limit = config.max_archive_expanded_size
    received = 0
    declared = 0

    def header(line: str) -> None:
        nonlocal declared
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and _is_ascii_number(value.strip()):
            declared = int(value.strip())

    too_big = DownloadFailed(f"downloading {url} failed: it passed {limit} bytes; stopped")
    with os.fdopen(fd, "wb") as sink:

        def write(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            if received > limit:
                raise too_big
            sink.write(chunk)

        request = HTTPRequest(
            url,
            streaming_callback=write,
            header_callback=header,
            request_timeout=config.download_timeout,
            follow_redirects=False,
        )
        try:
            await AsyncHTTPClient(max_body_size=limit + 1).fetch(request)
        except (HTTPClientError, OSError, TsctlError) as exc:
            partial.unlink(missing_ok=True)
            if received > limit or declared > limit:
                raise too_big from None
            if isinstance(exc, TsctlError):
                raise
            raise DownloadFailed(f"downloading {url} failed: {exc}") from None
    os.chmod(partial, 0o666 & ~_umask())  # mkstemp's file is private; the store's are not
    try:
        os.link(partial, target)  # unlike a rename, never replaces a file of that name
    except FileExistsError:
        raise Conflict(f"Model file already exists: {name}") from None
    finally:
        partial.unlink(missing_ok=True)
    return name


def _is_ascii_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every
    thread for a moment); 022 where /proc does not show it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
