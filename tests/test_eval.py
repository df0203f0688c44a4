"""Digits evaluation: the shipped classifier, FID against a float64 reference formula, coverage."""
import numpy as np
import pytest
import torch

from tdm_fast.demos.digits import load_digits_tensors
from tdm_fast.eval.classifier import accuracy, load_classifier
from tdm_fast.eval.digits import DigitsMetrics, acceptance, eval_inputs, format_table
from tdm_fast.eval.fid import fid_from_features, frechet_distance, gaussian_stats


def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID in float64: tr sqrt(Σa Σb) from the eigenvalues of the (non-symmetric) product."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(ca @ cb)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def test_fid_matches_reference_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 16, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(400, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64) * 0.3 + 0.5
    ours = fid_from_features(a, b)
    ref = reference_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_fid_self_zero_and_shift_positive():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, 32, generator=g)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + 0.5
    assert fid_from_features(a, shifted) == pytest.approx(32 * 0.25, rel=1e-4)
    scaled = 1.5 * a
    assert fid_from_features(a, scaled) > 1.0
    mu, cov = gaussian_stats(a)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-6)


def test_shipped_classifier_heldout_accuracy():
    clf = load_classifier()
    x, y = load_digits_tensors("heldout")
    acc = accuracy(clf, x, y)
    assert acc >= 0.95
    assert clf.info["heldout_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert clf.features(x[:3]).shape == (3, clf.config["feature_dim"])


def test_metrics_on_real_data():
    metrics = DigitsMetrics()
    x, y = load_digits_tensors("all")
    out = metrics(x, y, reference_features=metrics.real_features)
    assert out["fid_data"] == pytest.approx(0.0, abs=1e-6)
    assert out["fid_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert out["accuracy"] > 0.97
    assert out["coverage"] == pytest.approx(1.0)
    assert out["diversity"] == pytest.approx(1.0)
    noisy = metrics((x + 0.6 * torch.randn_like(x)).clamp(-1, 1), y)
    assert noisy["fid_data"] > 1.0
    # one sample per class repeated: coverage and diversity collapse
    first = torch.stack([x[y == c][0] for c in range(10)]).repeat(20, 1, 1, 1)
    collapsed = metrics(first, torch.arange(10).repeat(20))
    assert collapsed["coverage"] < 0.2 and collapsed["diversity"] < 1e-3


def test_eval_inputs_balanced_and_seeded():
    n1, l1 = eval_inputs(100, 3)
    n2, l2 = eval_inputs(100, 3)
    assert torch.equal(n1, n2) and torch.equal(l1, l2)
    assert torch.bincount(l1).tolist() == [10] * 10
    assert n1.shape == (100, 1, 8, 8)


def test_acceptance_and_table():
    rows = {
        "teacher-50": {"nfe": 100, "fid_teacher": 0.0, "fid_data": 5.0, "accuracy": 0.99, "coverage": 0.9, "diversity": 0.9},
        "tdm-4": {"nfe": 4, "fid_teacher": 2.0, "fid_data": 5.5, "accuracy": 0.98, "coverage": 0.9, "diversity": 0.9},
        "ddim4-trailing": {"nfe": 4, "fid_teacher": 10.0, "fid_data": 9.0, "accuracy": 0.9, "coverage": 0.8, "diversity": 1.0},
    }
    results = {"samples": 10, "seeds": [0], "cfg_scale": 2.0, "reference": "teacher-50", "samplers": rows,
               "comparisons": {"K=4": {"tdm": "tdm-4", "baseline": "ddim4-trailing", "candidates": ["ddim4-trailing"],
                                       "fid_ratio": 0.2, "accuracy_gap_to_teacher": -0.01}}}
    assert all(acceptance(results).values())
    table = format_table(results)
    assert "ddim4-trailing" in table and "| 4 |" in table


def test_lora_state_transfers_to_another_base():
    from tdm_fast.demos.digits import DigitsUNet, digits_denoiser
    from tdm_fast.eval.lora_transfer import apply_lora, lora_state, with_lora

    torch.manual_seed(0)
    base, other = digits_denoiser(DigitsUNet()), digits_denoiser(DigitsUNet())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([100, 800]), torch.tensor([1, 2])
    student = with_lora(base, rank=4)
    trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(student.model(x, t, y), base.model(x, t, y))  # zero-effect at init
        for n, p in student.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    state = lora_state(student)
    moved = apply_lora(other, state, rank=4)
    with torch.no_grad():
        assert not torch.allclose(moved.model(x, t, y), other.model(x, t, y))
        again = apply_lora(base, state, rank=4)
        assert torch.allclose(again.model(x, t, y), student.model(x, t, y), atol=1e-5)


def test_ablation_sweep_writes_the_table_and_checks_the_claims(tmp_path):
    from tdm_fast.eval.ablations import run_ablations

    table, results = run_ablations(tmp_path, iterations=4, seeds=(0, 1), samples=200, curve_every=2,
                                   curve_samples=100, progress=False)
    assert set(results["runs"]) == {"tdm", "clean", "no_is", "unify_no_k", "fisher", "dpmsolver"}
    assert all(set(runs) == {"0", "1"} for runs in results["runs"].values())
    assert "clean-sample matching" in table and "teacher-50 CFG" in table and "Training wall-clock" in table
    assert "the measure's floor" in table and results["fid_floor"] > 0
    claim_lines = [line for line in table.splitlines() if line.startswith("- ")]
    assert len(claim_lines) == 7 + 4 and all("spread" in line for line in claim_lines)
    assert any("paper Table 8" in line for line in claim_lines)
    # issue 19: the train × test solver table; both solver students scored with both solvers at K = 4
    assert "| DPM-Solver++(2M) |" in table and "[31.35]" in table
    for variant, trained in (("tdm", "ddim"), ("dpmsolver", "dpmsolver")):
        for run in results["runs"][variant].values():
            assert set(run["test_solvers"]) == {"K=4"} and set(run["test_solvers"]["K=4"]) == {"ddim", "dpmsolver"}
            assert run["test_solvers"]["K=4"][trained] == run["K=4"]
    assert (tmp_path / "ablations.json").exists() and (tmp_path / "quality_vs_iterations.png").exists()
    assert [p["iteration"] for p in results["curve"]["0"]] == [2, 4]


def test_ablations_run_on_another_builtin_teacher_with_its_recipe(tmp_path):
    from tdm_fast.eval.ablations import run_ablations

    table, results = run_ablations(tmp_path, iterations=2, seeds=(0,), variants=("tdm", "fisher"), samples=64,
                                   curve_every=2, curve_samples=64, builtin_teacher="digits-small-v",
                                   progress=False, kernels="reference")
    assert results["teacher_name"] == "digits-small-v" and results["recipe"] == "suite_config"
    assert set(results["runs"]) == {"tdm", "fisher"} and results["fid_floor"] > 0
    assert "Teacher `digits-small-v`" in table and "recipe `suite_config`" in table
    assert "| TDM (noisy matching, IS, K-conditioned unify) |" in table and "| Fisher divergence" in table
    assert "| teacher-50 CFG (reference, NFE 100) |" in table
    with pytest.raises(ValueError, match="not both"):
        run_ablations(tmp_path / "both", teacher_path=tmp_path, builtin_teacher="digits-dit")
    assert not (tmp_path / "both").exists()
