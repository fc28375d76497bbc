"""Every kernel test runs twice: all launches serial, and all parallel (the serial twins of
_launch.py must give what the parallel kernels give, and both what the references give)."""
from __future__ import annotations

import math

import pytest

from kimi_desktop.runtime import kernels as K


@pytest.fixture(autouse=True, params=["serial", "parallel"])
def launch_path(request):
    with K.policy.forced(math.inf if request.param == "serial" else 0):
        yield request.param
