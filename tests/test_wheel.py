"""The wheel a user installs: one top-level package, configs inside it, a CLI that runs anywhere.

The wheel is built from this checkout and installed into a fresh virtual environment outside it.
Its dependencies (torch, Ray, ... several GB) are not downloaded again: a ``.pth`` line lets the
fresh environment see this project's environment's site-packages, *after* its own, and that
environment's editable-install hook is not loaded (a path line in a ``.pth`` file is not a site
directory), so ``subq`` can only come from the installed wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of the files git would ship: an in-tree build/ may hold stale modules.
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, cwd=out, timeout=300)
    (whl,) = out.glob("subq-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=300, cwd=root)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_installs_one_top_level_package_with_its_configs_and_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"subq"}, f"generic top-level packages in the wheel: {sorted(tops - {'subq'})}"
    for wing in ("protocol", "data_store", "actors", "learner", "serve", "evaluation", "cluster"):
        assert f"subq/{wing}/__init__.py" in names
    shipped = {Path(n).name for n in names if n.startswith("subq/configs/")}
    assert shipped >= {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert any(n.startswith("subq/data_store/data/gsm8k/") for n in names), "embedded datasets missing"


def test_the_installed_cli_runs_from_any_directory(fresh_env: Path, tmp_path: Path) -> None:
    where = _run(fresh_env, str(fresh_env / "bin" / "python"), "-c",
                 "import subq, subq.learner.models, importlib.util as u; print(subq.__file__); "
                 "print(u.find_spec('learner'), u.find_spec('evaluation'), u.find_spec('serve'))", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    path, generic = where.stdout.splitlines()
    assert Path(path).is_relative_to(fresh_env), f"subq imported from {path}, not the installed wheel"
    assert generic == "None None None", f"generic packages importable: {generic}"

    version = _run(fresh_env, "subq", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "subq 0.1.0"

    check = _run(fresh_env, "subq", "pipeline", "--config", "quickstart", "--check", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("check: ok"), check.stdout

    typo = _run(fresh_env, "subq", "pipeline", "--config", "quickstrat", "--check", cwd=tmp_path)
    assert typo.returncode == 2 and "quickstrat" in typo.stderr, typo.stdout + typo.stderr
