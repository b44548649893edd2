import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CI replays the same examples every run; locally hypothesis explores.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def minilm_path():
    from stip.models import default

    return default.path()


@pytest.fixture(scope="session")
def minilm_sealed_dir(tmp_path_factory, minilm_path):
    """One on-disk sealing of the real MiniLM, shared by the tests that only read it."""
    from stip.seal import seal_folder

    out = tmp_path_factory.mktemp("minilm-sealed")
    seal_folder(minilm_path, out)
    return out
