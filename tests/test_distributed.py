"""Distributed training and evaluation on CPU with Gloo (issue 6).

Worker processes (tests/dist_workers.py) set a launcher's environment by hand and go through the real
`init_distributed`; their results are compared with the same work done here in one process.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vitkit.engine import launch as L
from vitkit.engine import parallel as P
from vitkit.engine.checkpoint import load_checkpoint, load_train_state
from vitkit.engine.config import optimizer_args
from vitkit.engine.evaluate import evaluate
from vitkit.engine.optim import create_optimizer
from vitkit.errors import ConfigError

import dist_workers as W

SINGLE = L.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
ATOL = 1e-5  # issue 6: same weights within 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(scenario: str, launcher: str, world: int, out: Path) -> None:
    mp.spawn(W.spawn_entry, args=(scenario, launcher, world, free_port(), str(out)), nprocs=world, join=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= ATOL, f"max weight difference {worst:.3g} > {ATOL}"


# -- launcher environment ----------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, ("torchrun", 3, 8, 1)),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     ("Open MPI", 1, 2, 1)),
    ({"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "16", "MV2_COMM_WORLD_LOCAL_RANK": "5"},
     ("MVAPICH2", 5, 16, 5)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}, ("MPI (PMI)", 2, 4, 0)),
    ({"PMI_RANK": "2", "PMI_SIZE": "4"}, ("MPI (PMI)", 2, 4, None)),
    # torchrun inside an MPI allocation: torchrun's own variables win
    ({"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"},
     ("torchrun", 0, 2, None)),
])
def test_detect_launcher(env: dict[str, str], expected: tuple) -> None:
    launch = L.detect_launcher(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == expected


def test_detect_launcher_none_and_bad_values() -> None:
    assert L.detect_launcher({"PATH": "/bin", "RANK": "0"}) is None  # RANK alone is not a launch
    with pytest.raises(ConfigError, match="rank 4 of 2"):
        L.detect_launcher({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not integers"):
        L.detect_launcher({"PMI_RANK": "x", "PMI_SIZE": "2"})


def test_distribute_true_without_launcher_is_a_clear_error() -> None:
    # (a recipe's distribute: true without a launcher falls back to one process in `resolve`: test_config.py)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        L.init_distributed(distribute=True, device="cpu", environ={})
    info = L.init_distributed(distribute=False, device="cpu", environ={})
    assert info == SINGLE and not info.distributed
    # a launcher that started one process: a plain single process, no process group
    info = L.init_distributed(distribute=True, device="cpu", environ={"RANK": "0", "WORLD_SIZE": "1"})
    assert info == SINGLE and not torch.distributed.is_initialized()


# -- optimizer state format ------------------------------------------------------------------------------------

def test_optimizer_state_is_torchs_format_and_round_trips_by_name() -> None:
    """The name-keyed form FSDP gathers converts to exactly torch's integer-keyed Optimizer.state_dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    cfg = W.tiny_cfg(weight_decay_filter="norm_and_bias")  # two param groups
    model, opt = W.train_steps(cfg, SINGLE, 1)
    by_name = get_optimizer_state_dict(model, opt, options=P._full_options())
    ours, torchs = P._fqn_to_index(by_name), opt.state_dict()
    assert len(torchs["param_groups"]) == 2
    assert ours["param_groups"] == torchs["param_groups"]
    assert ours["state"].keys() == torchs["state"].keys()
    for i, s in torchs["state"].items():
        for k, v in s.items():
            assert torch.equal(ours["state"][i][k], v)
    back = P._index_to_fqn(torchs, opt, model)
    assert back["param_groups"] == by_name["param_groups"] and back["state"].keys() == by_name["state"].keys()


# -- multi-process: training equals one process with the global batch ---------------------------------------

@pytest.fixture(scope="module")
def train_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Single-process references here, then the 2-process DDP/FSDP scenario (tests/dist_workers.py)."""
    out = tmp_path_factory.mktemp("dist_train")
    refs = {}
    for name, accum in {"ddp": 1, "ddp_accum2": 2}.items():
        cfg = W.tiny_cfg(batch_size=2 * W.BATCH, gradient_accumulation_steps=accum)
        model, opt = W.train_steps(cfg, SINGLE)
        refs[name] = P.model_state_dict(model)
        if name == "ddp":  # the checkpoint the FSDP workers resume from, and where one process goes on
            W.save_run(out / "single.safetensors", cfg, model, opt)
            W.train_steps(cfg, SINGLE, 1, model=model, opt=opt, start_batch=W.STEPS)
            refs["resumed"] = P.model_state_dict(model)
    spawn("train", "ompi", 2, out)  # Open MPI's variables, set by hand
    return out, {"refs": refs, "dist": torch.load(out / "train.pt", weights_only=True)}


def test_ddp_two_processes_equal_one_process_with_twice_the_batch(train_run: tuple[Path, dict]) -> None:
    _, r = train_run
    assert not r["dist"]["ddp_fsdp"]
    assert_same_weights(r["dist"]["ddp"], r["refs"]["ddp"])
    # and training did move the weights (the comparison is not vacuous)
    init = P.model_state_dict(W.build_model(W.tiny_cfg(), SINGLE))
    assert max((init[k] - r["refs"]["ddp"][k]).abs().max().item() for k in init) > 1e-3


def test_ddp_and_fsdp_with_gradient_accumulation(train_run: tuple[Path, dict]) -> None:
    _, r = train_run
    assert_same_weights(r["dist"]["ddp_accum2"], r["refs"]["ddp_accum2"])
    assert r["dist"]["fsdp_accum2_fsdp"]
    assert_same_weights(r["dist"]["fsdp_accum2"], r["refs"]["ddp_accum2"])


def test_fsdp_two_processes_equal_one_process(train_run: tuple[Path, dict]) -> None:
    _, r = train_run
    assert r["dist"]["fsdp_fsdp"]
    assert_same_weights(r["dist"]["fsdp"], r["refs"]["ddp"])


def test_fsdp_checkpoint_loads_in_one_process(train_run: tuple[Path, dict]) -> None:
    """Gathered FSDP weights validate in one process; the gathered optimizer state resumes there."""
    out, r = train_run
    ckpt = load_checkpoint(out / "fsdp.safetensors")
    assert_same_weights(ckpt.state_dict, r["refs"]["ddp"])
    cfg = W.tiny_cfg()
    model = ckpt.build_model()
    result = evaluate(model, W.eval_loader(W.tiny_cfg(batch_size=11), SINGLE), device="cpu")
    sharded = r["dist"]["fsdp_eval"]  # evaluated under FSDP on 2 ranks with 2 and 1 batches
    assert result["num_images"] == sharded["num_images"] == W.EVAL_IMAGES
    assert (result["correct1"], result["correct5"]) == (sharded["correct1"], sharded["correct5"])
    assert result["loss"] == pytest.approx(sharded["loss"], rel=1e-5)
    opt = create_optimizer(model, **optimizer_args(cfg))
    opt.load_state_dict(load_train_state(ckpt.path)["optimizer"])  # plain torch loading, no FSDP
    single = load_train_state(out / "single.safetensors")["optimizer"]
    for i, s in single["state"].items():
        assert torch.allclose(opt.state_dict()["state"][i]["momentum_buffer"], s["momentum_buffer"], atol=ATOL)


def test_single_process_checkpoint_resumes_under_fsdp(train_run: tuple[Path, dict]) -> None:
    _, r = train_run
    assert_same_weights(r["dist"]["fsdp_resumed"], r["refs"]["resumed"])


# -- multi-process: exact evaluation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval3_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_eval3")
    spawn("eval", "pmi", 3, out)  # MPICH's variables, set by hand
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_eval_counts_every_image_once(world: int, train_run: tuple[Path, dict], eval3_run: Path) -> None:
    """2 and 3 processes on 23 images (uneven shards) report exactly the single-process counts; the
    ranks were set up from MPI variables alone (Open MPI's, MPICH's), with the default master address."""
    out = train_run[0] if world == 2 else eval3_run
    got = torch.load(out / "eval.pt", weights_only=False)
    cfg = W.tiny_cfg()
    ref = evaluate(W.build_model(cfg, SINGLE), W.eval_loader(cfg, SINGLE), device="cpu", collect=True)
    res = got["result"]
    for key in ("num_images", "correct1", "correct5", "top1", "top5"):
        assert res[key] == ref[key], key
    assert res["num_images"] == W.EVAL_IMAGES and res["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert sorted(res["targets"].tolist()) == sorted(ref["targets"].tolist())
    assert sum(got["shards"]) == W.EVAL_IMAGES and len(set(got["shards"])) == 2  # uneven, no padding
    assert got["info"] == [(r, world, r, r == 0, "cpu") for r in range(world)]
    assert got["rank_sum"] == sum(range(1, world + 1)) and got["broadcast"] == {"from": 0}
    assert got["master"][0] == L.DEFAULT_MASTER_ADDR


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed")
def test_real_mpirun(tmp_path: Path) -> None:
    """`mpirun -n 2 python ...`: the seed's launcher, for real (Open MPI)."""
    cmd = ["mpirun", "-n", "2", "--oversubscribe", "-x", f"MASTER_PORT={free_port()}"]
    if hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, str(Path(__file__).with_name("dist_workers.py")), "eval", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = torch.load(tmp_path / "eval.pt", weights_only=False)
    assert [i[:2] for i in got["info"]] == [(0, 2), (1, 2)] and got["result"]["num_images"] == W.EVAL_IMAGES
