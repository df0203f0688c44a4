"""The embedded digits teacher: data split, network shapes, shipped weights, and a tiny demo run."""
import json

import torch

from tdm_fast.denoiser import Denoiser
from tdm_fast.demos.digits import (
    ASSETS, HELDOUT_SIZE, NULL_CLASS, DigitsUNet, augment, digits_denoiser, load_digits_teacher,
    load_digits_tensors, thicken,
)
from tdm_fast.sampling import sample_student


def test_split_is_fixed_disjoint_and_scaled():
    train_x, train_y = load_digits_tensors("train")
    held_x, held_y = load_digits_tensors("heldout")
    all_x, _ = load_digits_tensors("all")
    assert held_x.shape == (HELDOUT_SIZE, 1, 8, 8)
    assert train_x.shape[0] + held_x.shape[0] == all_x.shape[0] == 1797
    assert train_x.min() >= -1 and train_x.max() <= 1
    assert torch.bincount(held_y).min() >= 25  # stratified
    flat_train = {tuple(r.tolist()) for r in train_x.flatten(1)}
    overlap = sum(tuple(r.tolist()) in flat_train for r in held_x.flatten(1))
    assert overlap <= 3  # a few duplicates exist in the data set itself
    assert torch.equal(load_digits_tensors("heldout")[1], held_y)


def test_unet_shapes_and_steps_conditioning():
    model = DigitsUNet()
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 500, 999])
    labels = torch.tensor([0, 9, NULL_CLASS])
    assert model(x, t, labels).shape == x.shape
    assert model.sample_shape == (1, 8, 8)
    plain = digits_denoiser(model)
    x0_a, eps_a = plain(x, t, labels)
    steps = Denoiser(model, plain.schedule, "epsilon", NULL_CLASS, steps_set=(1, 2, 4))  # hooks the same model
    x0_b, eps_b = steps(x, t, labels, steps=2)
    assert torch.allclose(x0_a, x0_b) and torch.allclose(eps_a, eps_b)  # zero-initialised K embedding


def test_augment_and_thicken():
    x, _ = load_digits_tensors("heldout")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x[:4], g, 0), x[:4])
    shifted = augment(x[:4], g, 1)
    assert shifted.shape == (4, 1, 8, 8)
    thick = thicken(x[:16])
    assert (thick >= x[:16] - 1e-6).all() and thick.mean() > x[:16].mean()


def test_shipped_teacher_loads_and_samples():
    teacher = load_digits_teacher()
    assert teacher.training_info["iterations"] > 0
    assert sum(p.numel() for p in teacher.model.parameters()) == teacher.training_info["parameters"]
    size = sum(p.stat().st_size for p in ASSETS.glob("digits_teacher*") if p.is_file())
    assert size < 5 * 2**20  # a few MB at most
    # all built-in digits assets together: three teachers, the classifier, the teacher-50 cache
    assert sum(p.stat().st_size for p in ASSETS.glob("digits_*") if p.is_file()) < 8 * 2**20
    noise = torch.randn(10, 1, 8, 8)
    out = sample_student(teacher, noise, torch.arange(10), 2)
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_tiny_demo_writes_everything(tmp_path):
    from tdm_fast.demos.demo_digits import run_digits_demo

    torch.set_num_threads(1)
    out = tmp_path / "demo"
    metrics = run_digits_demo(out, iterations=2, samples=30, columns=4, batch_size=8, progress=False, latency=False)
    for name in ("grid.png", "metrics.json", "metrics.md", "train_log.jsonl", "student/denoiser.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["comparisons"]) == {"K=1", "K=2", "K=4"}
    for name in ("teacher-50", "tdm-1", "tdm-2", "tdm-4"):
        row = data["samplers"][name]
        for key in ("fid_teacher", "fid_data", "accuracy", "ms_per_image"):
            assert key in row
    assert data["training"]["iterations"] == 2 and data["training"]["wall_clock_s"] > 0
    assert metrics["acceptance"] == data["acceptance"]
    student = Denoiser.from_pretrained(out / "student")
    assert student.steps_set == (1, 2, 4)
    assert sample_student(student, torch.randn(2, 1, 8, 8), torch.tensor([3, 4]), 1).shape == (2, 1, 8, 8)
