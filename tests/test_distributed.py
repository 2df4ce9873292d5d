"""jmerge.distributed: the start-up's flags and checks, the single-process answers of every
collective, and bad multi-process starts (one line, exit 2, on every process)."""

import subprocess
import sys

import pytest

from jmerge import cli, distributed
from jmerge.errors import JmergeError
from test_multiprocess import free_port, pair_env, run_two

START_ENV = ("JMERGE_COORDINATOR", "JMERGE_NUM_PROCESSES", "JMERGE_PROCESS_ID", "JMERGE_INIT_TIMEOUT",
             "JMERGE_BARRIER_TIMEOUT", *distributed._CLUSTER_ENV)


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
    """This process is never part of a cluster: nothing of the runner's environment may start one."""
    for k in START_ENV:
        monkeypatch.delenv(k, raising=False)


def test_take_flags():
    argv = ["merge", "c.yaml", "--coordinator=h:1", "out", "--num-processes", "2", "--process-id", "0", "-q"]
    assert distributed.take_flags(argv) == (["merge", "c.yaml", "out", "-q"],
                                            {"coordinator": "h:1", "num_processes": "2", "process_id": "0"})
    assert distributed.take_flags(["x", "--coordinate", "h:1"]) == (["x", "--coordinate", "h:1"], {})
    for argv in (["x", "--process-id"], ["x", "--num-processes", "--force"]):
        with pytest.raises(JmergeError, match=f"{argv[1]} needs a value"):
            distributed.take_flags(argv)


@pytest.mark.parametrize("given, needle", [
    ({"process_id": "1"}, "missing: --coordinator / JMERGE_COORDINATOR, --num-processes / JMERGE_NUM_PROCESSES"),
    ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "coordinator 'nohost': expected host:port"),
    ({"coordinator": "h:0", "num_processes": 2, "process_id": 0}, "expected host:port"),
    ({"coordinator": "h:65536", "num_processes": 2, "process_id": 0}, "expected host:port"),
    ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, "--num-processes 'two': expected an integer"),
    ({"coordinator": "h:1", "num_processes": 0, "process_id": 0}, "process count 0: must be at least 1"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2},
     r"process id 2 is out of range for 2 processes \(ids are 0\.\.1\)"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": -1}, "process id -1 is out of range"),
])
def test_bad_start_settings(given, needle):
    with pytest.raises(JmergeError, match=needle):
        distributed.start(given)
    assert distributed.count() == 1  # nothing was started


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("JMERGE_COORDINATOR", "h:1")
    monkeypatch.setenv("JMERGE_NUM_PROCESSES", "2")
    monkeypatch.setenv("JMERGE_PROCESS_ID", "5")
    with pytest.raises(JmergeError, match="process id 5 is out of range"):
        distributed.start()
    with pytest.raises(JmergeError, match="process id 7 is out of range"):
        distributed.start({"process_id": "7"})  # a flag over the environment
    monkeypatch.setenv("JMERGE_PROCESS_ID", "1")
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("JMERGE_INIT_TIMEOUT", bad)
        with pytest.raises(JmergeError, match=f"JMERGE_INIT_TIMEOUT='{bad}': expected a positive number of seconds"):
            distributed.start()
    assert distributed.count() == 1


def test_bad_start_through_the_cli(capsys):
    """Every command takes the start-up flags; a bad start is one line and exit 2, before the
    command's own arguments are looked at."""
    for argv, needle in ((["check", "missing.yaml", "--process-id", "1"], "missing: --coordinator"),
                         (["merge", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
                          "process id 2 is out of range for 2 processes"),
                         (["eval", "--models", "m", "--num-processes"], "--num-processes needs a value")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("jmerge: error: ") and len(err.splitlines()) == 1 and needle in err, err


def test_single_process_answers(tmp_path):
    """Without a start every collective is the local answer, and nothing waits."""
    distributed.start({})
    assert (distributed.count(), distributed.index(), distributed.is_lead()) == (1, 0, True)
    distributed.barrier("nothing")
    assert distributed.gather("x", "mine") == ["mine"]
    assert distributed.on_lead("f", lambda: 42) == 42
    with pytest.raises(JmergeError, match="from fn"):
        distributed.on_lead("f", lambda: (_ for _ in ()).throw(JmergeError("from fn")))
    distributed.raise_any("ok", None)
    error = JmergeError("mine")
    with pytest.raises(JmergeError, match="mine") as got:
        distributed.raise_any("bad", error)
    assert got.value is error
    distributed.announce("gone", error)
    distributed.check_same_files([tmp_path / "missing", None, tmp_path])
    distributed.finish()


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_coordinator_unreachable_and_peer_missing(tmp_path):
    """Process 1 with nobody at the address, process 0 whose peer never comes: each says so in
    one line, exit 2, once JMERGE_INIT_TIMEOUT has passed."""
    procs = []
    for i in range(2):
        env = pair_env(free_port(), i, JMERGE_INIT_TIMEOUT="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "jmerge", "check", "missing.yaml"], env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        lines = lines_of(err)
        assert p.returncode == 2 and out == "" and len(lines) == 1, (i, err)
        assert lines[0].startswith("jmerge: error: could not join coordinator 127.0.0.1:") and \
            f"as process {i} of 2 within 2 s" in lines[0], lines


def test_process_counts_disagree(tmp_path):
    """Process 0 says 2 processes, process 1 says 3: both stop with the same line."""
    def env(port, i):
        return dict(pair_env(port, i, JMERGE_INIT_TIMEOUT="60"), JMERGE_NUM_PROCESSES=str(2 + i))
    texts = run_two(lambda port, i: [sys.executable, "-m", "jmerge", "check", "missing.yaml"], tmp_path, "counts",
                    env=env, cwd=lambda i: tmp_path, rcs=(2, 2), timeout=120)
    lines = [lines_of(t) for t in texts]
    assert lines[0] == lines[1] == ["jmerge: error: the processes disagree on the process count (process 0: 2, "
                                    "process 1: 3; the cluster has 2)"], lines
