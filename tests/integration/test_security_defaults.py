"""What the tests make cheap in their own process stays expensive in the product."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_passwords_are_hashed_with_argon2id_at_its_recommended_cost() -> None:
    probe = "from ml_platform.security import hash_password; print(hash_password('x' * 12))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
