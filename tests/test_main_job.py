"""The main job's harness (refit_engine.harness.main_job): where it runs, what it refuses before spawning,
and its options. The main job itself runs in test_slurm.py and the README's command."""

import argparse
import os

import pytest
import torch

from refit_engine.errors import RefitError
from refit_engine.harness import launch, main_job, spawn, topology


def test_backend_follows_the_gpus_per_rank():
    assert launch.choose_backend("auto", 4, 0) == ("gloo", "no GPU visible")
    backend, why = launch.choose_backend("auto", 4, 1)  # NCCL cannot put 4 ranks on one GPU
    assert backend == "gloo" and "4 ranks but 1 GPU" in why
    assert launch.choose_backend("auto", 4, 4)[0] == "nccl"
    assert launch.choose_backend("auto", 4, 8)[0] == "nccl"
    assert launch.choose_backend("gloo", 4, 8)[0] == "gloo"
    assert launch.choose_backend("nccl", 2, 2)[0] == "nccl"
    with pytest.raises(ValueError, match="one GPU per rank: 4 ranks .* 1 GPU"):
        launch.choose_backend("nccl", 4, 1)


class _Spawned(Exception):
    pass


def _main_spawning(monkeypatch, gpus, argv=()):
    """bench.main with `gpus` GPUs visible, stopped where it would spawn: (backend, env)."""
    seen = {}

    def run_ranks(fn, world, config, backend, *rank_args, env=None, **kwargs):
        seen.update(world=world, backend=backend, env=env)
        raise _Spawned

    monkeypatch.setattr(launch, "_gpu_count", lambda: gpus)
    monkeypatch.setattr(spawn, "run_ranks", run_ranks)
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(_Spawned):
        main_job.main(list(argv))
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
    procs = spawn.spawn_ranks(_report_environment, 1, queue, env=spawn.GLOO_ENV)
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
    main_job.place_on([model], "meta")
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _Stubborn())
    with pytest.raises(RefitError, match=r"1 tensors are not on meta.*1.expert_bias \(cpu\)"):
        main_job.place_on([model], "meta")


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
    def run_ranks(*a, **k):
        raise AssertionError("spawned")
    monkeypatch.setattr(spawn, "run_ranks", run_ranks)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 0)
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exc:
        main_job.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err


def test_identical_failures_are_reported_once():
    text = spawn.failure_report({2: "Traceback\nValueError: x\n", 0: "Traceback\nValueError: x\n",
                              1: "Traceback\nOSError: y\n"})
    assert text.count("ValueError: x") == 1 and text.startswith("ranks 0, 2:")
    assert "rank 1:\nTraceback\nOSError: y" in text


def test_every_option_has_help():
    missing = [a.option_strings for a in main_job.build_parser()._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"options without help: {missing}"


@pytest.mark.parametrize("device_name, preset_name", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "h100")])
def test_the_topology_is_named_after_the_device_it_runs_on(monkeypatch, device_name, preset_name):
    # An H200 was labelled "H100 SXM, measured": the preset follows torch's device name and the
    # label is the real device's, whatever GPU it is.
    from dataclasses import replace

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: argparse.Namespace(total_memory=141 * 2**30))
    monkeypatch.setattr(topology, "measure", lambda base: replace(base, name=f"{base.name}, measured"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    topo = topology.measure_here("cuda:0", 4)
    assert topo.name == f"{device_name}, measured" and topo.memory_gib == 141.0
    assert topo.copy_gbps == topology.PRESETS[preset_name].copy_gbps
    assert (topo.nodes, topo.gpus_per_node) == (1, 4)
    assert topology.measure_here("cpu", 4).name == "CPU (gloo), measured"  # CPU runs say cpu


def test_ranks_agree_on_one_backend():
    nccl = {"backend": "nccl", "why": "8 GPUs for 8 ranks: one GPU per rank"}
    short = {"backend": "gloo", "why": "8 ranks but 4 GPUs: NCCL cannot put several ranks on one GPU"}
    assert launch.agree_backend([{**nccl, "rank": r} for r in range(3)]) == ("nccl", nccl["why"])
    # One node short of GPUs: every rank on gloo (alone it would have built NCCL and hung).
    backend, why = launch.agree_backend([{**nccl, "rank": 0}, {**short, "rank": 9},
                                        {**short, "rank": 8}, {**nccl, "rank": 1}])
    assert backend == "gloo" and why.startswith("rank 8: 8 ranks but 4 GPUs") \
        and "(2 of 4 ranks), so every rank uses gloo" in why
    gloo = {"backend": "gloo", "why": "asked for (--backend gloo)"}
    assert launch.agree_backend([{**gloo, "rank": r} for r in range(2)]) == ("gloo", gloo["why"])
    # --backend nccl refused on one node: the same error on every rank.
    with pytest.raises(ValueError, match=r"needs one GPU per rank \(rank 5 and 1 more\)"):
        launch.agree_backend([{**nccl, "rank": 0}, {"rank": 6, "error": "other"},
                             {"rank": 5, "error": "needs one GPU per rank"}])


def test_decisions_are_exchanged_over_the_store_before_any_group():
    import threading

    import torch.distributed as dist
    for decisions, expect in (
            ([{"backend": "nccl", "why": "a"}, {"backend": "gloo", "why": "b"},
              {"backend": "nccl", "why": "a"}], ("gloo", "rank 1: b (1 of 3 ranks), so every rank uses gloo")),
            ([{"backend": "nccl", "why": "a"}, {"error": "no GPUs"}, {"backend": "nccl", "why": "a"}],
             ValueError("no GPUs (rank 1)"))):
        store, out = dist.HashStore(), {}

        def rank_main(rank):
            try:
                out[rank] = launch.exchange_decisions(store, rank, 3, decisions[rank], "t", 30)
            except ValueError as exc:
                out[rank] = exc
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in (2, 1, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        got = [out[r] if not isinstance(out[r], ValueError) else repr(out[r]) for r in range(3)]
        want = expect if not isinstance(expect, ValueError) else repr(expect)
        assert got == [want] * 3


def _launched_rank(rank, world, port, gpus, queue):
    """One rank as srun / torchrun starts it, on a node with gpus[rank] GPUs and one rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import torch.distributed as dist
    launch._gpu_count = lambda: gpus[rank]
    try:
        backend, why = launch.init_launched("auto", 60)
        queue.put((rank, backend, why, dist.get_backend()))
        dist.destroy_process_group()
    except BaseException as exc:
        queue.put((rank, "failed", repr(exc), None))


def test_launched_ranks_on_unequal_nodes_choose_the_same_backend():
    # Rank 0's node has 2 GPUs for its one rank (NCCL alone), rank 1's none: both use gloo.
    import multiprocessing as mp
    queue = mp.get_context("spawn").Queue()
    procs = spawn.spawn_ranks(_launched_rank, 2, [2, 0], queue)
    try:
        got = sorted(queue.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [g[1] for g in got] == ["gloo", "gloo"], got
    assert got[0][2] == got[1][2] == "rank 1: no GPU visible (1 of 2 ranks), so every rank uses gloo"
    assert got[0][3] == "gloo"


def _dying_worker(rank, world, config, backend, timeout):
    """Rank 1 is killed before reporting; rank 0 waits on it (as in a collective)."""
    import signal
    import time
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(90)


def test_a_rank_that_dies_without_reporting_is_named_within_seconds(monkeypatch, capsys):
    # The main job waited --timeout + 600 s for a report that never came.
    import threading
    import time
    monkeypatch.setattr(main_job, "rank_main", _dying_worker)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 0)
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    out = {}
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: out.update(code=main_job.main(
        ["--world", "2", "--src", "tp=1", "--dst", "tp=1", "--timeout", "30"])), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "still waiting on the dead rank"
    assert out["code"] != 0 and time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert "rank 1:\nprocess" in err and "died without reporting: killed by signal 9 (SIGKILL)" in err
    assert "rank 0:\nstopped: rank 1 died without reporting" in err


def test_exit_codes_in_words():
    assert spawn.exit_text(-9) == "killed by signal 9 (SIGKILL)"
    assert spawn.exit_text(3) == "exit code 3"
