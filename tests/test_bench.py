import os
import subprocess

import pytest
from conftest import ROOT, run_cli

FIGURES = (
    "augment alone",
    "model step alone",
    "full ssl_lab step",
    "reference (per-sample PIL)",
    "reference data path alone",
)


def test_bench_prints_the_four_figures_and_the_ratios():
    """`python -m ssl_lab.bench` with a tiny setting, as benchmarks/README.md shows it (no timing asserts)."""
    args = ["backbone=resnet_tiny", "batch_size=16", "data.limit_train=64", "--steps", "1", "--warmup", "1"]
    result = run_cli(*args, "--workers", "1", cwd=ROOT, module="ssl_lab.bench", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for figure in FIGURES:
        assert any(line.strip().startswith(figure) and "img/s" in line for line in lines), figure
    assert any(line.strip().startswith("full / model step alone") for line in lines)
    assert any(line.strip().startswith("full / reference") for line in lines)
    assert "test_resnet" in result.stdout and "batch 16" in result.stdout


def test_bench_follows_the_methods_views():
    """Multi-crop: every pipeline makes the method's views (2 global + 2 local), the reference too, one
    torchvision transform per view with that view's size and crop scale."""
    from ssl_lab import bench

    args = ["backbone=resnet_tiny", "batch_size=8", "data.limit_train=32", "method=dino",
            "method.num_prototypes=64", "method.num_local_crops=2", "method.local_crop_size=16",
            "method.global_crop_scale=[0.4,1.0]"]  # fmt: skip
    result = run_cli(
        *args, "--steps", "1", "--warmup", "1", "--workers", "0", cwd=ROOT, module="ssl_lab.bench"
    )
    assert result.returncode == 0, result.stderr
    assert "views: 2 x 32 px, 2 x 16 px" in result.stdout
    assert any(line.strip().startswith("reference (per-sample PIL)") for line in result.stdout.splitlines())

    cfg = bench.compose_config(args)
    step = bench.build_step(cfg, bench.pick_device("cpu"))
    dataset = bench.PerSampleViews(bench.load_data(cfg).train, step.view_augments())
    assert [tuple(v.shape) for v in dataset[0]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    crops = [t.transforms[0] for t in dataset.transforms]
    assert [(c.size, c.scale) for c in crops] == [((32, 32), (0.4, 1.0))] * 2 + [((16, 16), (0.05, 0.4))] * 2


def test_bench_gives_mae_its_one_view_and_its_mask_noise():
    """MAE's views are one image and per-patch noise: the bench lists one view, and the per-sample
    reference gets the noise from the method's own views() as the runner does."""
    args = ["backbone=timm", "backbone.name=test_vit", "++backbone.kwargs.patch_size=8", "batch_size=8",
            "data.limit_train=32", "method=mae", "method.decoder_dim=32", "method.decoder_depth=1",
            "method.decoder_heads=2"]  # fmt: skip
    result = run_cli(
        *args, "--steps", "1", "--warmup", "1", "--workers", "0", cwd=ROOT, module="ssl_lab.bench"
    )
    assert result.returncode == 0, result.stderr
    assert "views: 1 x 32 px" in result.stdout
    assert any(line.strip().startswith("reference (per-sample PIL)") for line in result.stdout.splitlines())


def test_bench_times_a_set_decoded_from_files_with_its_decoding_workers(tmp_path):
    """Images larger than image_size (ImageNet's case) are cropped by decoding workers: the bench times
    that path as the runner takes it, and the workers' share alone ("ssl_lab data path alone")."""
    from test_data import make_folder

    make_folder(tmp_path, per_class=16, size=(48, 40))
    args = ["data=imagefolder", f"data.root={tmp_path}", "data.image_size=16", "backbone=resnet_tiny"]
    result = run_cli(
        *args,
        "batch_size=8",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--workers",
        "1",
        cwd=ROOT,
        module="ssl_lab.bench",
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    for figure in (*FIGURES, "ssl_lab data path alone"):
        assert any(line.startswith(figure) and "img/s" in line for line in lines), figure
    assert any(line.startswith("full ssl_lab step") and "(mean)  1 workers" in line for line in lines)


def test_bench_rejects_a_bad_override_in_one_line():
    result = run_cli("backbone=nope", cwd=ROOT, module="ssl_lab.bench", fresh=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown backbone 'nope'")


def gpu_check(budget_s: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "GPU_CHECK_QUICK": "1",
        "GPU_CHECK_BUDGET_S": str(budget_s),
    }
    return subprocess.run(
        ["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=420
    )


PARTS = (
    "python -m ssl_lab.bench",
    "python -m ssl_lab.bench",
    "python -m ssl_lab.check_ddp --nproc 2 --steps 3 debug=smoke trainer.device=cpu logger=none method=nnclr",
    "python -m ssl_lab.train",
    "python -m ssl_lab.train",
    "python -m ssl_lab.bench",
    "python benchmarks/jpeg_folder.py outputs/gpu-check-jpegs --train 32 --val 8 && python -m ssl_lab.bench",
)


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_the_cpu():
    """benchmarks/gpu.sh as the first GPU machine will run it, rehearsed on the CPU in its tiny setting:
    every part runs to the end and prints its figures (a stale override or flag would fail here, not on
    the GPU's few minutes)."""
    result = gpu_check(400)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert [line[2:].split(" data=")[0] for line in out.splitlines() if line.startswith("$ ")] == list(PARTS)
    assert "(failed" not in out and "(cut" not in out and "(skipped" not in out, out
    assert out.count("(wall ") == len(PARTS)
    for figure in (*FIGURES, "host syncs per full step", "epoch 1/1  loss", "epoch 2/2  loss",
                   "kNN top-1 on the validation split", "channels_last bf16", "ssl_lab data path alone",
                   "PASS: 2 processes train like 1", "compiled", "augment alone, compiled",
                   "compile=True compile_augment=True"):  # fmt: skip
        assert figure in out, figure
    assert out.startswith("## GPU check") and out.rstrip().endswith("```")


def test_gpu_check_skips_the_parts_its_budget_leaves_no_time_for():
    result = gpu_check(5)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("(skipped: ") == len(PARTS), result.stdout
    assert "img/s" not in result.stdout


PARITY_RUNS = [
    ("lightly_mocov2", ["--views", "ssl_lab"]),
    ("lightly_mocov2", ["--views", "lightly"]),
    *((f"lightly_{m}", ["--views", "lightly", "--loop", "lightly"]) for m in ("mocov2", "byol", "simsiam", "barlowtwins", "vicreg")),
]  # fmt: skip


@pytest.mark.parametrize("experiment, mode", PARITY_RUNS)
def test_the_parity_script_runs_each_pairing(experiment, mode, tmp_path):
    """benchmarks/parity.py (experiments/README.md: parity with lightly's examples), tiny: one JSON line a
    run; `--loop lightly` for each of the five examples it reproduces."""
    import json
    import sys

    queue = ["method.queue_size=64"] if experiment == "lightly_mocov2" else []
    args = [f"experiment={experiment}", "data=synthetic", "data.num_train=64", "data.num_test=32",
            "data.image_size=16", "batch_size=32", "epochs=1", *queue, *mode]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "parity.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["views"] == mode[1] and line["loop"] == (mode[3] if len(mode) > 2 else "ssl_lab")
    assert line["experiment"] == experiment and 0 <= line["knn_top1"] <= 100
