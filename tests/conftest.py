import os

# Triton reads this when @triton.jit runs, so it must be set before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`bash run.sh test` runs one worker per core, up to 4) the workers share the cores: each
# worker and the processes its tests start take their share of threads, not all of them each.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A saved toy teacher (the 2-D mixture MLP, untrained): what the CLI tests distil."""
    from tdm_fast.demos.toy2d import ToyMLP, toy_denoiser

    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    toy_denoiser(ToyMLP(hidden=32, depth=1)).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_accelerator():
    """accelerate keeps one process-wide state; each test may ask for other mixed-precision settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# The files that take minutes (measured on 2 cores), longest first: pytest-xdist hands whole files to the
# workers in collection order, so starting these first leaves the short files to fill in at the end.
LONGEST_FIRST = ("test_compile_iteration.py", "test_fsdp.py", "test_atomic_outputs.py", "test_t2i_demo.py",
                 "test_export.py", "test_fresh_machine.py", "test_gpu_all.py", "test_distributed.py", "test_backbones.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
