"""Shared fixtures: tiny configs that exercise the real code paths in seconds."""
import os

import pytest

os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """Generated data and trained teachers, shared by every test of the session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny(tmp_path, shared_cache):
    """Overrides for a run that takes a few seconds: small data, crops, heads; no energy tracking."""
    def make(*extra: str, energy: bool = False) -> list:
        return [
            "budget=smoke", "dataset.sizes.train=24", "dataset.sizes.tune=8", "dataset.sizes.val=8",
            "budget.crop_size=[32,32]", "budget.iterations=4", "budget.eval_interval=2",
            "budget.teacher_iterations=4", "student.head_channels=16",
            "teacher=pspnet_resnet34", "teacher.head_channels=16", "progress=false", "threads=2",
            f"energy.enabled={str(energy).lower()}",
            f"paths.results={tmp_path / 'results'}", f"paths.reports={tmp_path / 'reports'}",
            f"paths.cache={shared_cache}", *extra]
    return make


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the in-process sweeps of a test module (start-up costs seconds); shut down
    when the module's tests are done."""
    import ray

    from harness.sweep.ray_runtime import start_local

    start_local(2, str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()
