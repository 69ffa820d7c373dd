"""A regular (non-editable) install ships the configs and runs from any directory; the README's
quick-start commands are the ones CI runs."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_module


def test_readme_quick_start_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Quick start")
    block = readme[readme.index("```bash", start) + len("```bash"): readme.index("```", readme.index("```bash", start) + 7)]
    commands = [line.strip() for line in block.strip().splitlines()]
    assert commands == ['pip install -e ".[test]" && python -m aomd.train', 'pip install -e ".[test]" && pytest']
    assert commands[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_wheel_ships_configs_and_trains_from_another_directory(tmp_path):
    # built from a copy of the sources: a build in the repository leaves build/ there, whose stale
    # modules a later wheel would ship
    sources = tmp_path / "sources"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_symlink() or (REPO / name).is_file():  # not a file deleted but not yet committed
            (sources / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, sources / name, follow_symlinks=False)  # conf/preset is a link
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(sources)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("aomd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("train.yaml", "evaluate.yaml", "objective.yaml", "loss/aomd_mode2.yaml", "dataset/synthetic.yaml",
                   "dataset/cub200.yaml", "preset/aomd_grid.yaml", "hydra/launcher/slurm.yaml", "ablation/both.yaml"):
        assert f"aomd/conf/{config}" in names, config
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import aomd; print(aomd.__file__)"], capture_output=True, text=True,
                           cwd="/", env={**__import__("os").environ, **env})
    assert where.stdout.strip().startswith(str(site)), where.stdout
    result = run_module("aomd.train", *TINY, "logger=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=Path("/"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "finished"
