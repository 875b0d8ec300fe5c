"""A real two-node Slurm cluster on one host for tests: munged, slurmctld and two slurmd from Debian packages.

Two `slurmd -N fastdpo-n1` / `-N fastdpo-n2` daemons share this host (NodeHostname) and 127.0.0.1 (NodeAddr),
each on its own port, with per-node spool, pid and log files (%n). The node names resolve through lines this
module adds to /etc/hosts and removes again (the launcher hands the first node's name to torchrun).
Everything else (config, keys, state, sockets, logs) lives in one temporary directory and the daemons
listen on free ports, so a Slurm that is already installed on the machine is left untouched.
Daemons run in the foreground (no systemd) and are stopped by the PIDs we started.

    cluster = SlurmCluster.start()        # installs the packages with apt-get when missing
    subprocess.run(["sbatch", ...], env=cluster.env)
    cluster.stop()

Run it by hand to get a cluster you can poke at: `python tests/slurm/slurm_cluster.py` (Ctrl-C stops it).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey"]
NODES = ["fastdpo-n1", "fastdpo-n2"]
HOSTS = Path("/etc/hosts")


def unavailable_reason():
    """Why this machine cannot host the test cluster, or None when it can."""
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd/slurmctld/munged and need root"
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install " + " ".join(PACKAGES)
    return None


def install():
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # A fresh CI image has empty package lists; update only when the install fails.
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=fastdpo-test
# Job ids restart at 1 with every new cluster; jobs log to logs/%x-%j.out with --open-mode=append, so a
# reused id would append to an old run's log. Start from a clock-derived id instead.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s);
# 10 s keeps the preemption test short.
AuthInfo=socket={munge_socket},cred_expire=10
# Slurm's default: SIGTERM, then SIGKILL 30 s later; the SIGTERM tests save a checkpoint within it.
KillWait=30
StateSaveLocation={root}/state
# %n: each slurmd (one per node name, both on this host) keeps its own spool, pid and log.
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
# No cgroups in a container: track processes by parent PID and do no CPU binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Look at pending jobs every second (default 60 s), so a requeued job restarts as soon as it may.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Requests the node can never satisfy (e.g. GPUs here) fail at submit instead of pending forever.
EnforcePartLimits=ALL
GresTypes=gpu
# Each node claims what the scripts' #SBATCH header asks for on a 4-GPU node (CPUs, memory), so the
# tests submit the scripts unchanged except for the GPU request; config_overrides stops slurmd
# from draining the node for having fewer real cores than configured.
SlurmdParameters=config_overrides
NodeName=DEFAULT CPUs=64 RealMemory=512000 State=UNKNOWN
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs = []
        self.hosts_line = None
        # Every Slurm command (and every job, which inherits it) finds this cluster through SLURM_CONF.
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start(cls, timeout=60):
        install()
        cluster = cls(Path(tempfile.mkdtemp(prefix="fastdpo-slurm-")))
        try:
            cluster._start(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, timeout):
        root = self.root
        root.chmod(0o755)
        munge_dir = root / "munge"
        munge_dir.mkdir(mode=0o700)
        (root / "state").mkdir()
        for node in NODES:
            (root / f"spool-{node}").mkdir()
        shutil.chown(munge_dir, "munge", "munge")
        key = munge_dir / "munge.key"
        subprocess.run(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                        "mungekey", "--create", f"--keyfile={key}"], check=True)
        munge_socket = munge_dir / "munge.socket"
        # setpriv execs in place, so the PID we hold is munged's own (runuser would fork).
        self._spawn("munged", ["setpriv", "--reuid=munge", "--regid=munge", "--init-groups",
                               "munged", "--foreground", "--force", f"--socket={munge_socket}",
                               f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                               f"--seed-file={munge_dir}/munged.seed",
                               f"--log-file={munge_dir}/munged.log"])
        self._wait(lambda: munge_socket.exists(), timeout, "munged socket")

        host = socket.gethostname().split(".")[0]  # must equal `hostname -s` or slurmd refuses
        self.conf.write_text(SLURM_CONF.format(
            host=host, root=root, munge_socket=munge_socket, first_job_id=int(time.time()) % 60_000_000 + 1,
            ctld_port=_free_port(), slurmd_port=_free_port(), node_list=",".join(NODES),
            nodes="\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()}"
                             for n in NODES)))
        self._add_hosts()
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout, "idle nodes")

    def _add_hosts(self):
        # In place (append, later rewrite), not by rename: /etc/hosts is often a bind mount in containers.
        # The line names this cluster's directory, so stop() removes exactly it, not another session's.
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # fastdpo test cluster {self.root}\n"
        with HOSTS.open("a") as f:
            f.write(self.hosts_line)

    def _remove_hosts(self):
        if self.hosts_line is None:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        if self.hosts_line in lines:
            lines.remove(self.hosts_line)
            with HOSTS.open("r+") as f:
                f.write("".join(lines))
                f.truncate()
        self.hosts_line = None

    def _spawn(self, name, cmd):
        log = open(self.root / f"{name}.stdout", "w")
        self.procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=self.env)))

    def _nodes_idle(self):
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.root}/{name}*.log "
                                   f"and {self.root}/{name}.stdout")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        return sorted(out.stdout.split()) == sorted([*NODES, *["idle"] * len(NODES)])

    @staticmethod
    def _wait(ok, timeout, what):
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm test cluster: no {what} after {timeout} s")
            time.sleep(0.5)

    def scontrol_job(self, job_id):
        """`scontrol show job` as a dict (no accounting here, so no sacct)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env,
                             capture_output=True, text=True, check=True).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def stop(self):
        # Reverse order: slurmd and slurmctld still talk to munged while they shut down.
        for _name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
        self._remove_hosts()


if __name__ == "__main__":
    # Ctrl-C or `kill PID` both stop the daemons (a background job starts with SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    c = SlurmCluster.start()
    print(f"Slurm is up: export SLURM_CONF={c.conf}   (Ctrl-C or kill {os.getpid()} stops it)", flush=True)
    try:
        signal.pause()
    finally:
        c.stop()
