import torch

from tdm_fast.eval.toy2d import mode_coverage, mode_precision, sliced_wasserstein
from tdm_fast.sampling import reference_sampler
from tdm_fast.demos.toy2d import NUM_CLASSES, mode_centers, sample_data, train_toy_teacher


def test_the_mixture_puts_three_quarters_of_each_class_on_its_own_modes():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=g)
    points = sample_data(labels, g)
    assert abs(mode_precision(points, labels) - 0.75) < 0.02
    assert mode_coverage(points, labels) > 0.99


def test_metrics_on_known_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 2, generator=g)
    assert sliced_wasserstein(a, a) == 0.0
    assert abs(sliced_wasserstein(a, a + torch.tensor([1.0, 0.0])) - 0.5**0.5) < 0.05  # mean over directions of cos²
    labels = torch.zeros(4, dtype=torch.long)
    on_one_mode = mode_centers()[[0, 0, 0, 0]]
    assert mode_precision(on_one_mode, labels) == 1.0 and mode_coverage(on_one_mode, labels) == 0.0


def test_cfg_matters_for_the_builtin_teacher():
    """The teacher is designed so that CFG 3 lifts mode precision by at least 15 points."""
    teacher = train_toy_teacher(progress=False)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_CLASSES, (2000,), generator=g)
    noise = torch.randn(2000, 2, generator=g)
    plain = mode_precision(reference_sampler(100, 1.0)(teacher, noise, labels), labels)
    guided = mode_precision(reference_sampler(100, 3.0)(teacher, noise, labels), labels)
    assert guided - plain >= 0.15, (plain, guided)


def test_the_toy_demo_seed_seeds_the_distillation(tmp_path):
    """`tdm-fast demo --dataset toy2d --seed N` was ignored: every seed gave the same students."""
    from safetensors.torch import load_file

    from tdm_fast.demos.demo_toy import run_toy_demo

    def student(seed, name):
        run_toy_demo(tmp_path / name, iterations=3, teacher_iterations=20, steps=(2,), samples=200, progress=False, seed=seed)
        files = sorted((tmp_path / name / "student-K2").rglob("*.safetensors"))
        return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}

    a, b, c = student(0, "a"), student(0, "b"), student(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
