"""ainode: an AI node for a hospital PACS."""

__version__ = "0.1.0"
