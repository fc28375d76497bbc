"""kimi-desktop: Kimi K2 offline on one workstation."""

__version__ = "0.1.0"
