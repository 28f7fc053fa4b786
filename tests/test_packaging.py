"""The wheel is self-contained: grammar/ and templates/ ship inside it, and
the console script works from another directory in a fresh environment."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_and_checks_an_example_elsewhere(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheels = list(dist.glob("nsa_dsl-*.whl"))
    assert len(wheels) == 1

    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "nsa_dsl/grammar/nsa.lark" in names
    assert "nsa_dsl/templates/module.py.jinja" in names and "nsa_dsl/templates/slc_fwd.py.jinja" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The fresh environment sees this one's dependencies (torch, lark, ...)
    # through a .pth line, but not this checkout: nsa_dsl must come from the wheel.
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    (fresh_site / "outer_deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "deepseek_nsa.nsa", work / "paper.nsa")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NSA_DSL_CACHE_DIR")}
    env["NSA_DSL_CACHE_DIR"] = str(tmp_path / "cache")
    where = subprocess.run([str(python), "-c", "import nsa_dsl, nsa_dsl.resources as r; print(nsa_dsl.__file__);"
                            " print(r.grammar_path())"], capture_output=True, text=True, cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    module_file, grammar = where.stdout.split()
    assert str(venv) in module_file and str(venv) in grammar, where.stdout

    check = subprocess.run([str(venv / "bin" / "nsa-dsl"), "check", "--explain", "paper.nsa"],
                           capture_output=True, text=True, cwd=work, env=env)
    assert check.returncode == 0, check.stderr
    assert "pattern deepseek_nsa: ok" in check.stdout and "slc_topk" in check.stdout
