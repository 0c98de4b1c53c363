"""Error types. Every error a user can cause is one of these, with a message that names the field or file."""

from __future__ import annotations


class UniMoEError(Exception):
    """Base class for errors UniMoE raises on purpose (the CLI prints them as one line)."""


class ConfigError(UniMoEError, ValueError):
    """An impossible or unknown configuration value. The message names the field and what to change."""


class InputError(UniMoEError, ValueError):
    """Model inputs that do not fit together (e.g. media parts and placeholder tokens that do not match)."""


class CheckpointError(UniMoEError, ValueError):
    """A checkpoint directory that is missing, incomplete or not a UniMoE / supported dense checkpoint."""


class HubError(UniMoEError, RuntimeError):
    """Uploading to or downloading from the Hugging Face Hub failed (offline, auth, missing repo)."""


class TrainingError(UniMoEError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite); the message says what was kept."""
