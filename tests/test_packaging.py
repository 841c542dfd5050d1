"""What a user's install needs: every third-party import declared in pyproject.toml, a clear
one-line error where an optional extra is missing, MovieLens-100K fetched without pip, and the
package importing and running on a CPU without Triton."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest

from climber.cli import main
from climber.data import fetch
from climber.data.events import DataError
from climber.serve.command import WEB_STACK

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_packaging_every_third_party_import_is_declared():
    project = pyproject()["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {name: {requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    declared = core | set().union(*extras.values())
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for path in (ROOT / "climber").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "climber":
                    continue
                dist = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not dist & declared:
                    missing[top] = str(path.relative_to(ROOT))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert project["name"] == "climber-rec" and "triton" not in core and not any("triton" in r for r in
                                                                                 project["dependencies"])
    assert {"fastapi", "uvicorn", "pydantic", "starlette"} <= extras["serve"] and not {"fastapi", "uvicorn"} & core


@pytest.mark.parametrize("module", WEB_STACK)
def test_packaging_serve_without_its_extra_is_a_one_line_error(module, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(tmp_path / "none")])
    err = capsys.readouterr().err
    package = module.replace("_", "-")
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"climber serve needs the {package} package" in err and "pip install 'climber-rec[serve]'" in err


def fake_wheel(path: Path) -> dict[str, bytes]:
    """A zip laid out like the recbole wheel's ml-100k folder; returns the files' contents."""
    files = {name: f"{name} contents\n".encode() for name in fetch.ML100K_FILES}
    with zipfile.ZipFile(path, "w") as z:
        for name, body in files.items():
            z.writestr(f"recbole/dataset_example/ml-100k/{name}", body)
        z.writestr("recbole/__init__.py", "")
    return files


@pytest.fixture
def no_pip(monkeypatch):
    """pip cannot be imported or run: the fetch must not need it."""
    monkeypatch.setitem(sys.modules, "pip", None)

    def refuse(*a, **k):
        raise AssertionError(f"fetch ran a subprocess: {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_packaging_fetch_movielens_without_pip(tmp_path, monkeypatch, no_pip):
    wheel = tmp_path / "fake.whl"
    files = fake_wheel(wheel)
    urls = []

    def download(url: str, dest: Path) -> None:  # stands in for the HTTPS request
        urls.append(url)
        dest.write_bytes(wheel.read_bytes())

    monkeypatch.setattr(fetch, "download", download)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    target = fetch.fetch_movielens(tmp_path / "cache" / "ml-100k")
    assert urls == [fetch.WHEEL_URL] and fetch.WHEEL_URL.startswith("https://")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files  # no .part files left
    fetch.fetch_movielens(target)  # cached: no second download
    assert len(urls) == 1


def test_packaging_fetch_refuses_a_wheel_with_another_digest(tmp_path, monkeypatch, no_pip):
    wheel = tmp_path / "fake.whl"
    fake_wheel(wheel)
    monkeypatch.setattr(fetch, "download", lambda url, dest: dest.write_bytes(wheel.read_bytes()))
    with pytest.raises(DataError, match="SHA-256"):
        fetch.fetch_movielens(tmp_path / "ml-100k")
    assert not (tmp_path / "ml-100k").exists()


def test_packaging_fetch_offline_is_a_data_error_naming_the_url(tmp_path, monkeypatch, no_pip):
    def offline(url, dest):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch, "download", offline)
    with pytest.raises(DataError, match=r"could not download MovieLens-100K .*files\.pythonhosted\.org.*Name or"):
        fetch.fetch_movielens(tmp_path / "ml-100k")


def test_packaging_runs_on_cpu_without_triton():
    """A user install has no Triton: the package imports, `auto` picks the reference attention,
    and asking for the kernels is a clear error."""
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch
from climber.model import make_model
from climber.runtime import Runtime, apply
from tests.helpers import random_batch, tiny_config
cfg = tiny_config()
model = make_model(cfg)
apply(model, Runtime(device="cpu"))
assert model.attention.name == "reference", model.attention
out = model(random_batch(cfg))
assert torch.isfinite(out).all()
try:
    apply(model, Runtime(device="cpu", attention="triton"))
except ValueError as e:
    assert "needs a CUDA GPU with Triton" in str(e)
else:
    raise AssertionError("triton without triton")
"""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
