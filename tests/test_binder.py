"""The mybinder.org environment (binder/) must resolve to versions that work together, the versions the course
is tested with, and every chapter must fit in the memory mybinder.org gives a session."""

import importlib.metadata
import json
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The course's libraries: binder must bound each one, and admit the version installed here.
BOUNDED = ["transformers", "peft", "bitsandbytes"]
# mybinder.org limits a session's pod to "2G" (Kubernetes units: 2e9 bytes, 1907 MiB), the Jupyter server included.
BUDGET_MIB = 2e9 / 2**20


def parse(text: str) -> tuple[dict[str, Requirement], list[str]]:
    """({name: requirement}, option lines such as --extra-index-url and -e) of a requirements file."""
    reqs, options = {}, []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        req = Requirement(line)
        reqs[canonicalize_name(req.name)] = req
    return reqs, options


def torch_pin(reqs: dict[str, Requirement]) -> Version:
    req = reqs.get("torch")
    assert req is not None, "binder/requirements.txt does not pin torch"
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"torch should be pinned with ==, not {req}"
    return Version(specs[0].version)


def declared_torch_needs(dist: str) -> list[Requirement]:
    """Every requirement on torch that `dist` (installed here) declares, under any extra: transformers declares
    its minimum under the "torch" extra, and refuses an older torch at import whatever was installed."""
    reqs = map(Requirement, importlib.metadata.requires(dist) or [])
    return [r for r in reqs if canonicalize_name(r.name) == "torch"]


def problems(text: str) -> list[str]:
    """What is wrong with a binder requirements file, checked against the packages installed here."""
    reqs, options = parse(text)
    torch = torch_pin(reqs)
    found = []
    if torch.local != "cpu":
        found.append(f"torch {torch} is not the CPU build (+cpu): the default wheel brings GBs of CUDA libraries")
    if not any(CPU_INDEX in o for o in options if o.startswith(("--extra-index-url", "--index-url"))):
        found.append(f"no --extra-index-url {CPU_INDEX}: pip cannot find torch {torch}")
    for dist in ["minilora", *BOUNDED, *(n for n in reqs if n not in ("torch", *BOUNDED))]:
        for spec in sorted({str(r.specifier) for r in declared_torch_needs(dist)}):
            if not SpecifierSet(spec).contains(torch, prereleases=True):
                version = importlib.metadata.version(dist)
                found.append(f"{dist} {version} requires torch{spec}, binder pins torch {torch}")
    for dist in BOUNDED + [n for n in reqs if n not in ("torch", *BOUNDED)]:
        req = reqs.get(dist)
        if req is None or not any(s.operator in ("==", "===", "<", "<=", "~=") for s in req.specifier):
            found.append(f"binder leaves {dist} unbounded: pip would take a release the course was not tested with")
            continue
        installed = importlib.metadata.version(dist)
        if not req.specifier.contains(installed, prereleases=True):
            found.append(f"binder's {req} excludes {dist} {installed}, the version the course is tested with")
    return found


def test_transformers_declares_a_minimum_torch():
    """Guards the check below against passing because transformers stopped saying what torch it needs."""
    needs = declared_torch_needs("transformers")
    assert needs and all(r.specifier for r in needs), needs


def test_binder_versions_hold_together_and_are_the_tested_ones():
    assert problems((BINDER / "requirements.txt").read_text()) == []


def test_the_check_rejects_a_torch_that_transformers_refuses():
    """torch 2.5.1 was binder's pin when transformers began to require torch >= 2.6."""
    text = (BINDER / "requirements.txt").read_text()
    old = "\n".join("torch==2.5.1+cpu" if line.startswith("torch==") else line for line in text.splitlines())
    assert any(p.startswith("transformers ") and "torch" in p for p in problems(old)), problems(old)


def test_binder_python_is_one_the_pinned_packages_support():
    """runtime.txt's Python must satisfy each pinned package's Requires-Python (transformers 5 needs 3.11),
    read from the installed package where it is the pinned version."""
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-"), runtime
    python = Version(runtime.removeprefix("python-"))
    reqs, _ = parse((BINDER / "requirements.txt").read_text())
    checked = []
    for name, req in [*reqs.items(), ("minilora", None)]:
        installed = Version(importlib.metadata.version(name))
        if req is not None and not req.specifier.contains(installed, prereleases=True):
            continue  # another version is installed here: its metadata says nothing about the pinned one
        needs = SpecifierSet(importlib.metadata.metadata(name)["Requires-Python"] or "")
        assert needs.contains(python), f"{name} {installed} requires Python {needs}; binder/runtime.txt says {runtime}"
        checked.append(name)
    assert "transformers" in checked, checked


MEMORY = json.loads((BINDER / "memory.json").read_text())["notebooks"]
COURSE = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "course").glob("*.ipynb"))


def test_every_chapter_has_a_measured_peak():
    assert sorted(MEMORY) == COURSE, "run python tools/measure_binder_memory.py"


@pytest.mark.parametrize("notebook", sorted(MEMORY), ids=lambda n: Path(n).stem)
def test_chapter_fits_in_binder_memory(notebook):
    entry = MEMORY[notebook]
    assert 0 < entry["peak_mib"] < BUDGET_MIB, (
        f"{notebook} peaks at {entry['peak_mib']} MiB on a CPU; mybinder.org allows {BUDGET_MIB:.0f} MiB")
