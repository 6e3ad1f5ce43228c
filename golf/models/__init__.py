"""The model families, one module each: the model, its presets and its contract hooks. Importing
a module registers its ModelSpec (golf.contract.MODELS) under the name of its bundle."""

import importlib

FAMILIES = ("gpt", "hydra", "manifold")


def registry():
    """{script name: ModelSpec} of every model family (importing each module registers it)."""
    for name in FAMILIES:
        importlib.import_module(f"golf.models.{name}")
    from golf.contract import MODELS

    return dict(MODELS)
