""".ci/run's transformers-4.57 environment (.ci/make_tf4_env) made from a virtualenv: it sees that virtualenv's
packages (not only its base interpreter's), its own site-packages come first, and a stale one is made again.
No pip install runs here (TF4_SKIP_INSTALL=1)."""
import os
import site
import subprocess
import sys
import sysconfig

from conftest import ROOT

RECIPE = ROOT / ".ci" / "make_tf4_env"


def purelib(venv):
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def make_running_venv(path, probe):
    """A virtualenv standing for the one CI runs in: torch, numpy and the rest are in its own site-packages (a
    .pth there adds this interpreter's site directories: pip cannot install torch here in seconds), and so is
    a module its base interpreter lacks: `probe` (VALUE = 'running venv')."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    lib = purelib(path)
    mine = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    if site.ENABLE_USER_SITE and site.getusersitepackages() in sys.path:
        mine.append(site.getusersitepackages())
    with open(os.path.join(lib, "zz_test_packages.pth"), "w") as f:
        f.write(f"import site; list(map(site.addsitedir, {list(dict.fromkeys(mine))!r}))\n")
    for name in (probe, "ci_probe_shadowed"):
        with open(os.path.join(lib, f"{name}.py"), "w") as f:
            f.write("VALUE = 'running venv'\n")
    return path / "bin" / "python"


def recipe(python, venv):
    subprocess.run(["bash", str(RECIPE), str(python), str(venv)], check=True, capture_output=True, text=True,
                   env={**os.environ, "TF4_SKIP_INSTALL": "1"})


def pyvenv_cfg(venv):
    return (venv / "pyvenv.cfg").read_text()


def test_tf4_env_made_from_a_virtualenv_sees_its_packages_and_its_own_first(tmp_path):
    python = make_running_venv(tmp_path / "running", "ci_probe_running")
    tf4 = tmp_path / "tf4"
    recipe(python, tf4)
    assert "include-system-site-packages = false" in pyvenv_cfg(tf4)
    # a package of tf4's own (transformers 4.57.6 in CI) shadows the running interpreter's
    with open(os.path.join(purelib(tf4), "ci_probe_shadowed.py"), "w") as f:
        f.write("VALUE = 'tf4'\n")
    out = subprocess.run([str(tf4 / "bin" / "python"), "-c",
                          "import torch, numpy, ci_probe_running, ci_probe_shadowed; "
                          "print(ci_probe_running.VALUE, '|', ci_probe_shadowed.VALUE, '|', torch.__version__)"],
                         check=True, capture_output=True, text=True).stdout.strip().split(" | ")
    assert out[:2] == ["running venv", "tf4"]
    assert out[2] == __import__("torch").__version__  # the same torch, shared


def test_a_stale_tf4_env_is_made_again_and_a_current_one_reused(tmp_path):
    tf4 = tmp_path / "tf4"
    # the old recipe's venv: --system-site-packages, which shows the base interpreter's packages only
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(tf4)], check=True)
    running = make_running_venv(tmp_path / "running", "ci_probe_running")
    recipe(running, tf4)
    assert "include-system-site-packages = false" in pyvenv_cfg(tf4)
    (tf4 / "sentinel").write_text("")
    recipe(running, tf4)  # same interpreter: reused (CI keeps its installed transformers)
    assert (tf4 / "sentinel").exists()
    other = make_running_venv(tmp_path / "other", "ci_probe_other")
    recipe(other, tf4)  # another interpreter: made again, for it
    assert not (tf4 / "sentinel").exists()
    probe = ("import importlib.util as u; print(u.find_spec('ci_probe_other') is not None, "
             "u.find_spec('ci_probe_running') is not None)")
    out = subprocess.run([str(tf4 / "bin" / "python"), "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"]


def test_ci_run_makes_the_tf4_env_with_the_recipe():
    run = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in run.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "--system-site-packages" not in run
    assert lines[-3:] == ["python -m pytest -q tests", "bash .ci/make_tf4_env python .venv-tf4",
                          ".venv-tf4/bin/python -m pytest -q tests"]
    text = RECIPE.read_text()
    assert 'pip install -q "transformers==4.57.6"' in text and "transformers.__version__ == '4.57.6'" in text
    for script in (ROOT / ".ci" / "run", RECIPE):
        subprocess.run(["bash", "-n", str(script)], check=True)
