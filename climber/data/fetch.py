"""Fetch MovieLens-100K into a local cache.

MovieLens may not be redistributed, so it is not in shared/data; PyPI serves it inside the
`recbole==1.2.1` wheel (RecBole atomic files). We download that wheel with pip (without
installing anything) and copy the three ml-100k files out of it with `zipfile`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from climber.data.events import DataError

ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
_WHEEL_SPEC = "recbole==1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"


def cache_root() -> Path:
    """The climber download cache: env CLIMBER_CACHE, else ~/.cache/climber."""
    env = os.environ.get("CLIMBER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "climber"


def fetch_movielens(cache_dir: Path | None = None) -> Path:
    """Return a directory holding ml-100k.{inter,user,item}, downloading them if needed."""
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "ml-100k"
    if all((target / name).is_file() for name in ML100K_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", _WHEEL_SPEC, "-d", tmp]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise DataError(
                f"could not download {_WHEEL_SPEC} (it carries MovieLens-100K) with pip; is PyPI reachable? "
                f"pip said: {(done.stderr or done.stdout).strip()[-500:]}"
            )
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in ML100K_FILES:
                # Write beside the target and rename, so an interrupted fetch never leaves a half file.
                part = target / f".{name}.part"
                part.write_bytes(wheel.read(_WHEEL_DIR + name))
                os.replace(part, target / name)
    return target
