"""Warnings our code causes fail the test that causes them: here in the pytest process, and through
``launcher.warnings_as_errors`` in the processes tests/launcher.py starts."""

import re

from launcher import FIXED_DEPRECATIONS


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", r"error:::torchtrain(\.|$)")
    for message in FIXED_DEPRECATIONS:
        config.addinivalue_line("filterwarnings", f"error:{re.escape(message)}")
