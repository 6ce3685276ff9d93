"""What torchtrain puts into a Python environment, and what a fresh machine installs.

The wheel is built by pip from the checkout and inspected; the import checks run in new interpreters
from the repository root (where a checkout on ``sys.path`` could shadow other packages) and from
another directory; the installed versions are compared with ``constraints.txt``.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from launcher import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(name): version for name, version in
            (line.split("==") for line in lines if line and not line.startswith("#"))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of the checkout: setuptools' build/ folder (whose stale files a wheel would take
    # along) stays out of both.
    source, out = tmp_path_factory.mktemp("source") / "torchtrain", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "outputs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, cwd=out)
    (built,) = out.glob("torchtrain-*.whl")
    return built


def test_wheel_installs_only_the_torchtrain_name_and_every_source_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"torchtrain", f"{wheel.name.split('-py3')[0]}.dist-info"}
    # The top-level kernels/ and recipes/ folders go in under torchtrain/, with everything in them.
    expected = {f"torchtrain/{p.relative_to(REPO / 'torchtrain').as_posix()}" for p in
                (REPO / "torchtrain").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"torchtrain/kernels/{p.relative_to(REPO / 'kernels').as_posix()}" for p in
                 (REPO / "kernels").rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"torchtrain/recipes/{p.name}" for p in (REPO / "recipes").glob("*.toml")}
    assert any(name.startswith("torchtrain/kernels/attention/") for name in expected)
    assert expected <= set(names), sorted(expected - set(names))
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    for command, target in PROJECT["scripts"].items():
        assert f"{command} = {target}" in entry_points


# Runs in a new interpreter: transformers and every distribution it depends on must resolve to
# themselves, with torchtrain installed and, in the first case, the checkout first on sys.path.
_IMPORTS_BESIDE_US = r"""
import importlib.metadata, importlib.util, json, sys
from pathlib import Path
from packaging.requirements import Requirement
import transformers
from transformers import LlamaForCausalLM
import torchtrain.kernels.attention, torchtrain.train
checked = {}
for text in importlib.metadata.requires("transformers") or []:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    dist = importlib.metadata.distribution(requirement.name)
    files = [f for f in dist.files if not f.parts[0].endswith((".dist-info", ".data")) and f.parts[0] != ".."]
    # Its import names: packages (a top-level folder with an __init__.py) and top-level modules.
    top_level = {f.parts[0] for f in files if len(f.parts) == 2 and f.name == "__init__.py"}
    top_level |= {f.name.split(".")[0] for f in files if len(f.parts) == 1 and f.suffix in (".py", ".so")}
    own = {Path(dist.locate_file(f)).resolve() for f in files}
    for name in sorted(n for n in top_level if not n.startswith("_")):
        spec = importlib.util.find_spec(name)
        where = Path(spec.origin).resolve()
        assert where in own, (requirement.name, name, str(where))
        checked[name] = str(where)
print(json.dumps(checked))
"""


@pytest.mark.parametrize("cwd", ["repository root", "another directory"])
def test_transformers_and_its_dependencies_import_beside_torchtrain(cwd, tmp_path):
    # "-c" puts the working directory first on sys.path, as "python -m" and torchrun do.
    proc = subprocess.run([sys.executable, "-c", _IMPORTS_BESIDE_US], capture_output=True, text=True,
                          cwd=REPO if cwd == "repository root" else tmp_path, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    checked = json.loads(proc.stdout.splitlines()[-1])
    assert "huggingface_hub" in checked and "tokenizers" in checked, checked
    if "kernels" in {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("transformers")}:
        assert "kernels" in checked  # Hugging Face's "kernels": the name our kernels/ folder must not take


# Needed only by some runs: a data format's reader, float8, TensorBoard, Hugging Face's libraries.
ON_USE = ("zstandard", "pyarrow", "datasets", "torchao", "tensorboard", "transformers")


def test_packages_only_some_runs_need_are_imported_on_use():
    """The commands start in an environment without them (a PyTorch image with only its own packages):
    importing them is left to the code that needs them."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ON_USE)  # None: any import of it fails
    code = f"import sys; {blocked}; " + "; ".join(f"import {m}" for m in COMMANDS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_pyproject_ranges_admit_the_pins_and_every_dependency_is_pinned():
    pinned = pins()
    assert pinned["torch"] == "2.13.0"
    for text in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not pinned in constraints.txt (run scripts/lock.sh)"
        assert requirement.specifier.contains(pinned[name]), (text, pinned[name])


def _made_by_setup() -> bool:
    return any(Path(sys.prefix, stamp).is_file() for stamp in (".installed-test", ".installed"))


@pytest.mark.skipif(not _made_by_setup(), reason="runs in the environment scripts/setup.sh made")
def test_the_environment_holds_exactly_the_pinned_versions():
    """A dependency missing from constraints.txt, or pinned at another version, fails here, in CI,
    rather than on a user's machine the day a new release of it comes out."""
    pinned = pins()
    local = Path(sys.prefix).resolve()
    wrong = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("pip", "torchtrain") or not Path(dist.locate_file("")).resolve().is_relative_to(local):
            continue  # a PyTorch image's own packages (torch, triton) are the image's
        if pinned.get(name) != dist.version.split("+")[0]:
            wrong[name] = (dist.version, pinned.get(name))
    assert not wrong, f"installed vs pinned: {wrong}; run scripts/lock.sh"


def test_docs_name_no_path_of_a_build_machine():
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "bench").glob("*.py")]
    for path in texts:
        for marker in ("/work/", "/root/", "/home/", "../shared/"):
            assert marker not in path.read_text(), f"{path.relative_to(REPO)} names {marker!r}"


COMMANDS = ["torchtrain.train", "torchtrain.plan", "torchtrain.generate", "torchtrain.export"]
TAKES_A_RECIPE = ["torchtrain.train", "torchtrain.plan", "torchtrain.export"]


def help_text(*command: str, cwd: Path) -> str:
    proc = subprocess.run([*command, "--help"], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage:"), proc.stdout[:300]
    return proc.stdout


@pytest.mark.parametrize("module", COMMANDS)
def test_every_console_command_prints_help_from_another_directory(module, tmp_path):
    """Through the installed entry point (``torchtrain-train``, ...), which runs the module's main as
    ``python -m`` does; the help of a command that takes a recipe documents every recipe key."""
    script = Path(sys.executable).parent / f"torchtrain-{module.split('.')[1]}"
    assert script.is_file(), f"{script.name} is not installed (pyproject.toml [project.scripts])"
    text = help_text(str(script), cwd=tmp_path)
    if module not in TAKES_A_RECIPE:
        return
    import dataclasses

    from torchtrain.config import Config

    sections = text.split("\n[")[1:]
    defaults = Config()
    assert [s.split("]")[0] for s in sections] == [f.name for f in dataclasses.fields(Config) if f.name != "source"]
    for section in sections:
        name, body = section.split("]", 1)
        lines = body.splitlines()
        for field in dataclasses.fields(getattr(defaults, name)):
            default = getattr(getattr(defaults, name), field.name)
            row = next(i for i, line in enumerate(lines) if line.startswith(f"  {field.name} = "))
            shown = lines[row].split(" = ", 1)[1]
            assert shown.strip('"') == str(default).lower() if isinstance(default, bool) else (
                shown.strip('"') == str(default) or json.loads(shown) == default), (name, field.name, shown)
            assert lines[row + 1].startswith("      ") and lines[row + 1].strip(), f"{name}.{field.name} undocumented"
    assert "tokens per sample" in text  # the comment beside training.seq_len in torchtrain/config.py


def test_train_without_a_recipe_prints_usage_and_fails(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torchtrain.train", "--training.steps", "3"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage:") and proc.stderr.rstrip().splitlines()[-1].startswith("error: no recipe")
    assert "Traceback" not in proc.stderr and not (tmp_path / "outputs").exists()


def test_installed_package_trains_the_default_recipe_from_another_directory(wheel, tmp_path):
    """``pip install .`` (not editable), then the README's recipe path from a folder that is not the
    checkout: the recipe and the kernels come from the installed copy."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torchtrain.train", "--config", "recipes/debug.toml",
                           "--training.steps", "3", "--lr_scheduler.warmup_steps", "1", "--compile.enabled", "false"],
                          capture_output=True, text=True, cwd=run_dir, env=dict(os.environ, PYTHONPATH=str(target)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    resolved = (run_dir / "outputs/debug/config.toml").read_text()
    assert f"# resolved from {target / 'torchtrain/recipes/debug.toml'}" in resolved
    assert "step 3" in (run_dir / "outputs/debug/train.log").read_text()


def dockerfile_steps() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), comments dropped."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_pinned_dependencies_before_the_sources_and_keeps_the_image_torch():
    steps = dockerfile_steps()
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG" and "=" in arg)
    # A PyTorch image of the pinned release; its torch and triton are kept (nothing installs them).
    assert args["BASE"].startswith(f"pytorch/pytorch:{pins()['torch']}-cuda")
    runs = [arg for kind, arg in steps if kind == "RUN"]
    assert all(arg.startswith("bash scripts/setup.sh") for arg in runs), runs
    # The dependency layer needs only the files that pin them; the sources come after it.
    copies = [(i, arg) for i, (kind, arg) in enumerate(steps) if kind == "COPY"]
    everything = next(i for i, arg in copies if arg.split()[0] == ".")
    deps = next(i for i, (kind, arg) in enumerate(steps) if kind == "RUN" and "--deps-only" in arg)
    assert deps < everything
    for i, arg in copies:
        if i < everything:
            assert set(arg.split()[:-1]) <= {"pyproject.toml", "constraints.txt", "scripts/setup.sh"}, arg
    # Test extras only on request (a build argument, empty by default).
    assert args["EXTRA"] == '""' and all("${EXTRA}" in arg for arg in runs)
    assert steps[-1] == ("CMD", '["bash", "scripts/train.sh"]')
    assert "bash scripts/train.sh" in (REPO / "README.md").read_text()
    assert ".venv" in (REPO / ".dockerignore").read_text().split()
    # setup.sh leaves the torch and triton pins out when it builds on an image's packages.
    setup = (REPO / "scripts/setup.sh").read_text()
    assert "--system-site-packages" in setup and 'grep -v -E "^(torch|triton)=="' in setup
