"""A real wheel, installed outside the checkout, carries the recipes and runs the CLI from any directory."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None, reason="the dev extra installs hatchling")
def test_installed_wheel_lists_recipes_and_fits_from_a_recipe_name(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dist, site, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    # The build backend is already installed (dev extra), so no index is needed here.
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(dist)], check=True)
    wheel = next(dist.glob("retrofit-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("retrofit/recipes/")}
    assert {f"retrofit/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= shipped
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # dependencies from this environment, retrofit from the wheel

    def retrofit(*args: str) -> str:
        done = subprocess.run([str(site / "bin" / "retrofit"), *args], cwd=elsewhere, env=env, text=True,
                              capture_output=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import retrofit; print(retrofit.__file__)"], cwd=elsewhere,
                           env=env, text=True, capture_output=True, check=True).stdout
    assert Path(where).is_relative_to(site)
    listed = retrofit("recipes")
    assert all(p.stem in listed for p in (ROOT / "recipes").glob("*.yaml"))
    config = yaml.safe_load(retrofit("fit", "--config", "dinov2_vitb14_reg4", "--data.source", ".", "--print_config"))
    assert config["model"]["backbone"] == "vit_base_patch14_dinov2.lvd142m" and config["data"]["img_size"] == 518
