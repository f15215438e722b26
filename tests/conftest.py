"""Shared fixtures: the offline data root, one cache for the whole session, small tasks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import bench.testing  # noqa: F401  (registers the tiny-images / tiny-vectors tasks)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("BENCH_DATA", DEFAULT_DATA))
    if not (root / "mnist").exists():
        pytest.skip(f"offline data not found at {root}; set BENCH_DATA")
    return root


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory) -> Path:
    """One cache (classifier weights, FID reference statistics) for the whole test session."""
    path = os.environ.get("BENCH_CACHE")
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest -n: the workers' temporary roots share a parent; one cache there serves them all (entries
        # are built under a lock, so the digits classifier and FID statistics are computed once)
        path = tmp_path_factory.getbasetemp().parent / "bench-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("bench-cache")
    os.environ["BENCH_CACHE"] = str(path)
    return path


# Files that take minutes, longest first. Under `pytest -n 2 --dist loadfile` each worker takes whole files from a
# queue (the first two files, then the next two, one each, then on demand); started last, these would leave one
# worker running alone at the end. test_contract.py holds every registered method's behavioural and resume suites.
# The last four hold the diffusion and flow baselines' toy-task fits (their order is a guess, not a measurement).
LONG_FILES = ("test_contract.py", "test_e2e.py", "test_faults.py", "test_e2e_methods.py", "test_baselines_ot.py",
              "test_baselines_diffusion.py", "test_executors.py", "test_egsde.py", "test_scones.py", "test_ddib.py",
              "test_reflow.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: the rest keep their order


def pytest_configure(config):
    """Under pytest -n, one torch thread per worker: the workers already fill the cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)
    elif getattr(config.option, "loadscopereorder", None):
        # xdist's loadfile/loadscope queue orders files by their number of tests unless told not to; the
        # collection order above (longest first) is the better order for this suite (this also overrides
        # an explicit --loadscope-reorder)
        config.option.loadscopereorder = False


@pytest.fixture
def in_two_threads():
    """Run ``work()`` in two threads at once (two users of one cache, as processes of a grid or test workers
    would be); return both results, or fail the test with what either raised."""
    import threading

    def run(work):
        results, errors = [], []

        def worker():
            try:
                results.append(work())
            except Exception as exc:  # surfaced below
                errors.append(exc)
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        return results
    return run


@pytest.fixture
def one_thread():
    """Small networks: one torch thread beats two on a busy 2-core CI machine."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty BENCH_CACHE for one test (derived artefacts are rebuilt inside it)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(path))
    return path


@pytest.fixture
def script():
    """Load a script of the repository as a module, to test the functions it runs: ``script("readme_table")``
    is scripts/readme_table.py, ``script("studies/otcs_stage2/otcs_condition_use.py")`` a study's script."""
    import importlib.util

    def load(name: str):
        path = REPO / name if name.endswith(".py") else REPO / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


TEST_FID_REF = 100  # Chinese-MNIST test images in FID's reference for the shrunk smoke runs of run_bench


@pytest.fixture(scope="session")
def run_bench(data_root, bench_cache):
    """`bench <args>` in this process (the CLI's own entry point), failing the test on a non-zero exit.

    ``eval_per_class`` shrinks the digits smoke evaluation (25 sources per class) for plumbing checks, and
    with it FID's reference (500 Chinese-MNIST test images on smoke) to ``TEST_FID_REF`` images: Inception
    dominates a smoke run on the CPU (about 1 image/s per worker under `pytest -n 2`), and the README's main
    job runs the full smoke evaluation as a newcomer does."""
    def run(*args: str, eval_per_class: int | None = None) -> None:
        import bench.datasets.digits as digits
        from bench.cli import main
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BENCH_DATA", str(data_root))
            mp.setenv("BENCH_CACHE", str(bench_cache))
            if eval_per_class is not None:
                mp.setitem(digits.EVAL_PER_CLASS, "smoke", eval_per_class)
                mp.setitem(digits.DigitsTask.fid_ref_sizes, "smoke", TEST_FID_REF)
            try:
                main(list(args))
            except SystemExit as exc:
                assert exc.code in (0, None), f"`bench {' '.join(args)}` exited with {exc.code}"
    return run


@pytest.fixture
def third_party_plugin(monkeypatch, tmp_path):
    """``load(src, module)``: make the module ``src/<module>.py`` a plugin the way a user does (its folder importable,
    ``BENCH_PLUGINS=<module>``), so that the next registry lookup imports it, as a fresh `bench` process would.
    The registries are copies for the test: the other tests never see the plugin."""
    import sys

    import bench.registry as registry

    loaded: list[str] = []

    def load(src: Path, module: str) -> None:
        registry.load_plugins()  # everything registered so far stays; only BENCH_PLUGINS is read again
        monkeypatch.syspath_prepend(str(src))
        monkeypatch.setenv("BENCH_PLUGINS", module)
        monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(registry, "_extra_loaded", False)
        for reg in (registry.METHODS, registry.TASKS):
            monkeypatch.setattr(reg, "_table", dict(reg._table))
            monkeypatch.setattr(reg, "_origin", dict(reg._origin))
        loaded.append(module)

    yield load
    for module in loaded:
        sys.modules.pop(module, None)


@pytest.fixture
def bench_ok():
    """`bench <args>` through click's runner in this process; its output, failing the test on a non-zero exit."""
    from click.testing import CliRunner

    from bench.cli import cli

    def run(*args) -> str:
        res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output
    return run
