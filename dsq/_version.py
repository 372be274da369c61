"""The dsq version: its own module, so reading it (`dsq --version`, file headers) imports nothing heavy."""

__version__ = "0.1.0"
