"""sora-gateway: one upstream video-generation account, shared safely by many teams."""

__version__ = "0.1.0"
