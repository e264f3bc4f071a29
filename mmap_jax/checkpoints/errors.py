"""The one exception type checkpoint loading raises for bad or unsupported inputs."""
from __future__ import annotations


class CheckpointError(ValueError):
  """A checkpoint cannot be used as given; the message names the file, key or field."""
