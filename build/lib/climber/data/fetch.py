"""Fetch MovieLens-100K into a local cache.

MovieLens may not be redistributed, so it is not in this repository; PyPI serves it inside the
`recbole==1.2.1` wheel (RecBole atomic files). We download that one file over HTTPS with the
standard library (`urllib`), check its SHA-256, and copy the three ml-100k files out of it with
`zipfile`: no pip, so it works in a venv made without pip (`uv venv`, `--without-pip`), and
nothing of recbole is installed. PyPI's files never change once uploaded, so the URL and digest
are pinned.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from climber.data.events import DataError

ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
WHEEL_URL = ("https://files.pythonhosted.org/packages/ab/fe/7d606cb7cd2b166a36b100cb9435d21014ceee16c192d972deb0"
             "976967a8/recbole-1.2.1-py3-none-any.whl")
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"


def cache_root() -> Path:
    """The climber download cache: env CLIMBER_CACHE, else ~/.cache/climber."""
    env = os.environ.get("CLIMBER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "climber"


def download(url: str, dest: Path) -> None:
    """Write the body of `url` to `dest` (HTTPS proxies from the environment are honoured)."""
    with urllib.request.urlopen(url, timeout=60) as r, dest.open("wb") as f:
        shutil.copyfileobj(r, f)


def fetch_movielens(cache_dir: Path | None = None) -> Path:
    """Return a directory holding ml-100k.{inter,user,item}, downloading them if needed."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "ml-100k"
    if all((target / name).is_file() for name in ML100K_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / "recbole-1.2.1-py3-none-any.whl"
        try:
            download(WHEEL_URL, wheel)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"could not download MovieLens-100K (inside the recbole 1.2.1 wheel) from {WHEEL_URL}: "
                            f"{getattr(e, 'reason', e)}; is PyPI reachable? Or put ml-100k.inter/.user/.item "
                            f"in {target}") from None
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise DataError(f"the download from {WHEEL_URL} has SHA-256 {digest}, not {WHEEL_SHA256}: "
                            "damaged or not the recbole 1.2.1 wheel")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            for name in ML100K_FILES:
                # Write beside the target and rename, so an interrupted fetch never leaves a half file.
                part = target / f".{name}.part"
                part.write_bytes(z.read(_WHEEL_DIR + name))
                os.replace(part, target / name)
    return target
