"""sora-gateway: one upstream video-generation account, shared safely by many teams."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Written once, in pyproject.toml; the installed distribution's metadata carries it.
    __version__ = version("sora-gateway")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
