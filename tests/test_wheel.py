"""A real wheel, installed outside the checkout, carries the recipes and runs the CLI from any directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_lists_recipes_and_fits_from_a_recipe_name(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    # The build backend is already installed (dev extra), so no index is needed here.
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(dist)], check=True)
    wheel = next(dist.glob("retrofit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {name for name in names if name.startswith("retrofit/recipes/")}
    assert {f"retrofit/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= shipped
    license_file = next(name for name in names if name.endswith(".dist-info/licenses/LICENSE"))  # as declared
    assert zipfile.ZipFile(wheel).read(license_file).decode() == (ROOT / "LICENSE").read_text()
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # dependencies from this environment, retrofit from the wheel
    runs = [  # two processes at once: each spends most of its time importing torch and Lightning
        subprocess.Popen([str(site / "bin" / "retrofit"), *args], cwd=elsewhere, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in (["recipes"], ["fit", "--config", "dinov2_vitb14_reg4", "--data.source", ".", "--print_config"])
    ]
    (listed, err), (printed, err_fit) = (run.communicate() for run in runs)
    assert [run.returncode for run in runs] == [0, 0], err + err_fit
    shipped_yaml = sorted((ROOT / "recipes").glob("*.yaml"))
    assert f"{len(shipped_yaml)} recipes in {site / 'retrofit' / 'recipes'}" in listed  # the wheel's copy, not ours
    assert all(p.stem in listed for p in shipped_yaml)
    config = yaml.safe_load(printed)
    assert config["model"]["backbone"] == "vit_base_patch14_dinov2.lvd142m" and config["data"]["img_size"] == 518
