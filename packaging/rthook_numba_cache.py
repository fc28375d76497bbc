"""PyInstaller runtime hook: where numba keeps the compiled kernels in the bundle.

A frozen app has no source files for numba to key its cache on, so numba would fall back to a folder
named after the path the kernels' modules report, which in a bundle is relative to the current
directory: every new working directory would compile the kernels again (minutes). The spec ships the
kernels' sources (module_collection_mode "py") and this hook points NUMBA_CACHE_DIR at the user's cache
folder, under a hash of those sources: the bundle's own folder may be read-only (/opt, Program Files),
and numba stamps a frozen app's cache entries with the executable, which does not change when only a
kernel does. An explicit NUMBA_CACHE_DIR wins.
"""

import os
import sys

if not os.environ.get("NUMBA_CACHE_DIR"):
    import hashlib

    import platformdirs

    kernels = os.path.join(getattr(sys, "_MEIPASS", os.path.dirname(sys.executable)),
                           "kimi_desktop", "runtime", "kernels")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(kernels)) if os.path.isdir(kernels) else ():
        if name.endswith(".py"):
            with open(os.path.join(kernels, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(platformdirs.user_cache_dir("kimi-desktop"), "numba",
                                                 digest.hexdigest()[:16])
