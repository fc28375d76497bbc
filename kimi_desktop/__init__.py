"""kimi-desktop: Kimi K2 offline on one workstation."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# A source checkout keeps runtime/, offload/ and ui/ beside this folder; an install puts them inside
# it (pyproject's package-dir mapping). Started from inside the checkout (`python -m kimi_desktop`,
# or a worker the bench starts there), this folder shadows any installed copy, so its subpackages are
# looked up in the checkout too: the checkout's code runs, whole.
_here = _Path(__file__).resolve().parent
if not (_here / "runtime").is_dir() and (_here.parent / "runtime" / "__init__.py").is_file() \
        and (_here.parent / "pyproject.toml").is_file():
    __path__.append(str(_here.parent))
del _Path, _here
