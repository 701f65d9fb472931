"""A real llama.cpp ``llama-server`` for the tests: the binary that ``.ci/build-llama-server``
builds into a cache outside the clone, a tiny random-weight llama model written here with the
``gguf`` package, and the server as a process on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import numpy as np

from tests.processes import ROOT, free_port

BUILD_SCRIPT = ROOT / ".ci" / "build-llama-server"
VOCAB = "ggml-vocab-llama-spm.gguf"  # llama.cpp's own tokenizer test file (32,000 tokens)
CTX = 256  # tokens of context the model and the server have


def llama_dir() -> Path:
    """The cache directory the build script uses (``$LLAMA_SERVER_DIR`` or its default)."""
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir"], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def missing() -> str | None:
    """Why llama-server cannot run here (None when the binary and vocabulary are there)."""
    d = llama_dir()
    for need in (d / "bin" / "llama-server", d / "models" / VOCAB):
        if not need.exists():
            return (
                f"{need} is missing: build llama-server with `bash .ci/build-llama-server` "
                "(needs cmake, make and g++; about 8 minutes once, then cached)"
            )
    return None


def write_model(path: Path, vocab: Path, seed: int = 1234) -> Path:
    """A 2-layer llama with random weights and ``vocab``'s tokenizer, as a GGUF file."""
    reader = gguf.GGUFReader(vocab)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    n_layer, n_embd, n_head, n_head_kv, n_ff = 2, 64, 4, 2, 128
    head_dim = n_embd // n_head

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(CTX)
    writer.add_block_count(n_layer)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), vtype, sub)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        # numpy (rows, columns) is ggml's (ne1, ne0): weights are stored (out, in).
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm() -> np.ndarray:
        return np.ones(n_embd, dtype=np.float32)

    # No output.weight: the output projection is tied to the token embedding.
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", norm())
    for i in range(n_layer):
        blk = f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", norm())
        writer.add_tensor(blk + "attn_q.weight", weight(n_head * head_dim, n_embd))
        writer.add_tensor(blk + "attn_k.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(blk + "attn_v.weight", weight(n_head_kv * head_dim, n_embd))
        writer.add_tensor(blk + "attn_output.weight", weight(n_embd, n_head * head_dim))
        writer.add_tensor(blk + "ffn_norm.weight", norm())
        writer.add_tensor(blk + "ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(blk + "ffn_down.weight", weight(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class LlamaServer:
    """``llama-server`` serving ``model`` as "tiny" on a free port; its log is ``log``."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    @classmethod
    def start(cls, binary: Path, model: Path, log: Path, *args: str) -> LlamaServer:
        port = free_port()
        cmd = [
            str(binary),
            *("-m", str(model), "-a", "tiny"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--ctx-size", str(CTX), "-np", "1", "--threads", "1", "--threads-http", "2"),
            # The same request gives the same tokens: no reuse of an earlier request's
            # KV cache (a batch of a different shape can round differently).
            "--no-cache-prompt",
            *("--seed", "42"),
            "--no-webui",
            "--slots",
            *args,
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        server = cls(proc, port, log)
        try:
            server.wait_healthy()
        except BaseException:
            server.stop()
            raise
        return server

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "llama-server died:\n" + self.log.read_text()
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server never got healthy:\n" + (
                self.log.read_text()
            )
            time.sleep(0.05)

    def processing(self) -> bool:
        """Whether a slot is generating now (``GET /slots``)."""
        status, body = self.get("/slots")
        assert status == 200, body
        return any(slot.get("is_processing") for slot in json.loads(body))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def established(pid: int, port: int) -> int:
    """How many established TCP connections process ``pid`` holds to 127.0.0.1:``port``:
    its socket descriptors (``/proc/PID/fd``) matched by inode in ``/proc/PID/net/tcp``."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote, state, inode = fields[2], fields[3], fields[9]
                    if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                        count += inode in inodes
        except FileNotFoundError:
            continue
    return count
