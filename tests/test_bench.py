"""The main job's harness (refit_engine.bench): where it runs, what it refuses before spawning,
and its options. The main job itself runs in test_slurm.py and the README's command."""

import argparse
import os

import pytest
import torch

from refit_engine import bench


def test_backend_follows_the_gpus_per_rank():
    assert bench.choose_backend("auto", 4, 0) == ("gloo", "no GPU visible")
    backend, why = bench.choose_backend("auto", 4, 1)  # NCCL cannot put 4 ranks on one GPU
    assert backend == "gloo" and "4 ranks but 1 GPU" in why
    assert bench.choose_backend("auto", 4, 4)[0] == "nccl"
    assert bench.choose_backend("auto", 4, 8)[0] == "nccl"
    assert bench.choose_backend("gloo", 4, 8)[0] == "gloo"
    assert bench.choose_backend("nccl", 2, 2)[0] == "nccl"
    with pytest.raises(ValueError, match="one GPU per rank: 4 ranks .* 1 GPU"):
        bench.choose_backend("nccl", 4, 1)


class _Spawned(Exception):
    pass


def _main_spawning(monkeypatch, gpus, argv=()):
    """bench.main with `gpus` GPUs visible, stopped where it would spawn: (backend, env)."""
    seen = {}

    def spawn(target, world, args, queue, env=None):
        seen.update(world=world, backend=args.backend, env=env)
        raise _Spawned

    monkeypatch.setattr(bench, "_gpu_count", lambda: gpus)
    monkeypatch.setattr(bench, "spawn_ranks", spawn)
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(_Spawned):
        bench.main(list(argv))
    return seen


def test_main_runs_nccl_with_a_gpu_per_rank_and_cpu_gloo_otherwise(monkeypatch, capsys):
    # Four ranks, one GPU: gloo, and the spawned ranks see no GPU (megatron-core would put
    # some tensors on cuda:0 and every rank would refuse a refit over two devices).
    seen = _main_spawning(monkeypatch, gpus=1)
    assert seen == {"world": 4, "backend": "gloo", "env": {"CUDA_VISIBLE_DEVICES": ""}}
    out = capsys.readouterr().out
    assert "spawning 4 gloo processes, every tensor on CPU: 4 ranks but 1 GPU" in out
    # A GPU for every rank: NCCL, GPUs left visible (rank r on cuda:r).
    seen = _main_spawning(monkeypatch, gpus=8)
    assert seen == {"world": 4, "backend": "nccl", "env": None}
    assert "spawning 4 nccl processes, one GPU each: 8 GPUs for 4 ranks" in capsys.readouterr().out
    # Asked for gloo on a GPU machine: CPU all the same.
    assert _main_spawning(monkeypatch, gpus=8, argv=["--backend", "gloo"])["env"] == \
        {"CUDA_VISIBLE_DEVICES": ""}


def _report_environment(rank, world, port, queue):
    queue.put(os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_spawned_ranks_get_the_environment_from_the_start(monkeypatch):
    import multiprocessing as mp
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    queue = mp.get_context("spawn").Queue()
    procs = bench.spawn_ranks(_report_environment, 1, queue, env=bench.GLOO_ENV)
    assert queue.get(timeout=120) == ""
    for p in procs:
        p.join(timeout=60)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # this process's is left as it was


class _Stubborn(torch.nn.Module):
    """A module whose tensors stay where they are when the model is moved."""

    def __init__(self):
        super().__init__()
        self.register_buffer("expert_bias", torch.zeros(3))

    def _apply(self, fn, recurse=True):
        return self


def test_place_on_moves_every_tensor_or_names_the_strays():
    # "meta" stands in for the other device (this machine has no GPU): megatron-core on a CUDA
    # host leaves buffers such as the router's expert_bias on the current GPU.
    model = torch.nn.Linear(2, 2)
    model.register_buffer("expert_bias", torch.zeros(2))
    bench.place_on([model], "meta")
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _Stubborn())
    with pytest.raises(bench.RefitError, match=r"1 tensors are not on meta.*1.expert_bias \(cpu\)"):
        bench.place_on([model], "meta")


@pytest.mark.parametrize("argv, message", [
    (["--src", "tp=3"], "source layout tp=3,pp=1,ep=1,etp=1: TP 3 x PP 1 = 3 does not divide 4 ranks"),
    (["--dst", "tp=1,ep=3"], "EP 3 x ETP 1 x PP 1 = 3 does not divide 4 ranks"),
    (["--non-collocated", "--src", "tp=4"], "does not divide 2 ranks (half of the world"),
    (["--non-collocated", "--world", "3"], "the world must be even, not 3"),
    (["--src", "tp=2,ep=32"], "EP 32 x ETP 1 x PP 1 = 32 does not divide 4 ranks"),
    (["--model", "num_heads=6", "--src", "tp=4"], "the model's 6 attention heads do not divide by TP 4"),
    (["--model", "num_experts=6", "--src", "tp=1,ep=4"], "6 experts do not divide by EP 4"),
    (["--src", "tp=1,pp=4", "--model", "num_layers=2"], "2 layers cannot fill 4 pipeline stages"),
    (["--src", "tp=x"], "argument --src: bad layout 'tp=x'"),
    (["--dst", "dp=2"], "unknown layout key 'dp'"),
    (["--model", "bogus=1"], "unknown field(s) ['bogus']"),
    (["--iters", "0"], "argument --iters: must be at least 1, not 0"),
    (["--iters", "-3"], "argument --iters: must be at least 1, not -3"),
    (["--world", "0"], "argument --world: must be at least 1, not 0"),
    (["--world", "-2"], "argument --world: must be at least 1, not -2"),
    (["--warmup", "-1"], "argument --warmup: must be at least 0, not -1"),
    (["--bucket-mib", "0"], "argument --bucket-mib: must be at least 1"),
    (["--timeout", "0"], "argument --timeout: must be positive"),
    (["--backend", "nccl"], "--backend nccl needs one GPU per rank: 4 ranks"),
])
def test_bad_options_are_refused_before_spawning(monkeypatch, capsys, argv, message):
    def spawn(*a, **k):
        raise AssertionError("spawned")
    monkeypatch.setattr(bench, "spawn_ranks", spawn)
    monkeypatch.setattr(bench, "_gpu_count", lambda: 0)
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err


def test_identical_failures_are_reported_once():
    text = bench.failure_report({2: "Traceback\nValueError: x\n", 0: "Traceback\nValueError: x\n",
                                 1: "Traceback\nOSError: y\n"})
    assert text.count("ValueError: x") == 1 and text.startswith("ranks 0, 2:")
    assert "rank 1:\nTraceback\nOSError: y" in text


def test_every_option_has_help():
    missing = [a.option_strings for a in bench.build_parser()._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("device_name, preset_name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "h100")])
def test_the_topology_is_named_after_the_device_it_runs_on(monkeypatch, device_name, preset_name):
    # An H200 was labelled "H100 SXM, measured": the preset follows torch's device name and the
    # label is the real device's, whatever GPU it is.
    from dataclasses import replace

    import refit_engine.topology as topology
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: argparse.Namespace(total_memory=141 * 2**30))
    monkeypatch.setattr(topology, "measure", lambda base: replace(base, name=f"{base.name}, measured"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    topo = bench.measure_here("cuda:0", 4)
    assert topo.name == f"{device_name}, measured" and topo.memory_gib == 141.0
    assert topo.copy_gbps == topology.PRESETS[preset_name].copy_gbps
    assert (topo.nodes, topo.gpus_per_node) == (1, 4)
    assert bench.measure_here("cpu", 4).name == "CPU (gloo), measured"  # CPU runs say cpu
