"""Failures a user can act on. Each message is the one line the operator copies into the Failed condition."""

from __future__ import annotations


class FineTuneError(Exception):
    """Base of every failure the program reports as one line on stderr with a non-zero exit."""

    exit_code = 1


class ConfigError(FineTuneError):
    """The spec asks for something this pod cannot do (qlora without a GPU, unsloth without its image...)."""

    exit_code = 2


class DatasetError(FineTuneError):
    """A row, or the dataset as a whole, cannot be used."""

    exit_code = 3


class ModelNotFoundError(FineTuneError):
    """The base model is neither a local directory nor reachable on the hub."""

    exit_code = 4


class ExportError(FineTuneError):
    """The adapter trained, but an export that was asked for (merged model, GGUF) is impossible here."""

    exit_code = 5
