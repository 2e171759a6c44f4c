"""The loud side of deliberate differences from loralib: warnings shown once per process."""
from __future__ import annotations

__all__: list = []
