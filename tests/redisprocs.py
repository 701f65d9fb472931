"""Real redis-server processes on loopback for the tests: a Redis Cluster, and a master with
a replica behind three Sentinels. Short timeouts throughout, so a failover takes seconds."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.processes import free_port

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout and Sentinel's down-after-milliseconds


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError):
            pass
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Node:
    """One redis-server: ``args`` on a free port, its files in ``tmp``."""

    def __init__(self, tmp: Path, *args: str, sentinel: bool = False) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.args = args
        self.sentinel = sentinel
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        if self.sentinel:
            # A Sentinel's configuration file comes first, and it rewrites it as it learns.
            command = [REDIS, str(self.tmp / "sentinel.conf"), "--sentinel"]
        else:
            # No RDB, no AOF; a replica's first sync at once (Redis 7 waits 5 s by default).
            command = [REDIS, "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.tmp)]
            + list(self.args),
            stdout=(self.tmp / f"{self.port}.log").open("ab"),
        )
        wait_until(self.client().ping, 10, f"redis-server on {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def info(self, section: str) -> dict:
        return self.client().info(section)


class Cluster:
    """``masters`` masters with ``replicas`` replicas each, made by ``redis-cli --cluster
    create``. Each node has its own bus port (``cluster-port``), so any free port will do."""

    def __init__(self, tmp: Path, masters: int = 3, replicas: int = 0) -> None:
        self.nodes: list[Node] = []
        for i in range(masters * (1 + replicas)):
            cport = free_port()
            self.nodes.append(
                Node(
                    tmp / f"node{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(cport),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    # A replica may take over however long it has been away from its master.
                    "--cluster-replica-validity-factor",
                    "0",
                )
            )
        self.replicas = replicas
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [REDIS_CLI, "--cluster", "create"]
            + [f"127.0.0.1:{n.port}" for n in self.nodes]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_ok()
        if self.replicas:
            self.wait_synced()

    def wait_synced(self) -> None:
        wait_until(self._replicas_synced, 20, "the replicas did not sync")

    def wait_ok(self, timeout: float = 20) -> None:
        """Until every running node says the cluster is ok and sees every slot served."""

        def ok() -> bool:
            for node in self.running():
                info = node.client().execute_command("CLUSTER INFO")
                if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                    return False
            return True

        wait_until(ok, timeout, "the cluster is not ok")

    def _replicas_synced(self) -> bool:
        for node in self.running():
            info = node.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None]

    def masters(self) -> list[Node]:
        return [n for n in self.running() if n.info("replication")["role"] == "master"]

    def master_of(self, key: str) -> Node:
        """The running master that serves ``key``'s slot now."""
        slot = self.masters()[0].client().execute_command("CLUSTER KEYSLOT", key)
        for node in self.masters():
            for start, end, *_ in node.client().execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return self.by_port(_[0][1])
        raise AssertionError(f"no master for slot {slot}")

    def by_port(self, port: int) -> Node:
        return next(n for n in self.nodes if n.port == port)

    def flush(self) -> None:
        for node in self.masters():
            node.client().flushall()
            node.client().config_resetstat()

    def commandstats(self) -> dict[int, dict]:
        """``INFO commandstats`` of each running node, by port."""
        return {n.port: n.info("commandstats") for n in self.running()}

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


class SentinelSet:
    """A master, one replica, and three Sentinels watching them as ``relay``."""

    SERVICE = "relay"

    def __init__(self, tmp: Path) -> None:
        self.master = Node(tmp / "master")
        self.replica = Node(tmp / "replica", "--replicaof", "127.0.0.1", "0")
        self.sentinels: list[Node] = []
        self.tmp = tmp
        for i in range(3):
            self.sentinels.append(Node(tmp / f"sentinel{i}", sentinel=True))
        self.url = (
            "redis+sentinel://"
            + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels[:2])
            + f"/{self.SERVICE}/0"
        )

    def start(self) -> None:
        self.master.start()
        self.replica.args = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.tmp.mkdir(parents=True, exist_ok=True)
            (sentinel.tmp / "sentinel.conf").write_text(
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {NODE_TIMEOUT_MS}\n"
                f"sentinel failover-timeout {self.SERVICE} 3000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            sentinel.start()
        wait_until(self._ready, 20, "the Sentinels do not see the replica and each other")

    def _ready(self) -> bool:
        if self.replica.info("replication").get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            state = sentinel.client().execute_command("SENTINEL", "MASTER", self.SERVICE)
            if int(state[b"num-slaves"]) < 1 or int(state[b"num-other-sentinels"]) < 2:
                return False
        return True

    def master_port(self) -> int:
        _, port = (
            self.sentinels[0]
            .client()
            .execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        )
        return int(port)

    def stop(self) -> None:
        for node in [*self.sentinels, self.master, self.replica]:
            node.kill()
