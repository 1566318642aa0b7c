"""Configuration: typed models, loading with clear errors, and hot reload."""

from sidecar.config.loader import ConfigError, LoadedConfig, load_default, load_file, load_text
from sidecar.config.model import Config

__all__ = ["Config", "ConfigError", "LoadedConfig", "load_default", "load_file", "load_text"]
