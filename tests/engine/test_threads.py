"""The thread budget: threads x concurrent model calls within the cores, --threads checked, idle threads sleep."""

import os
import subprocess
import sys

import pytest

from otclip.engine.threads import available_cores, thread_budget


def test_budget_divides_the_cores_among_concurrent_calls():
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert thread_budget() == cores
    assert thread_budget(concurrent_calls=2) == max(1, cores // 2)
    assert thread_budget(concurrent_calls=10 * cores) == 1
    assert thread_budget(3) == 3
    with pytest.raises(ValueError, match="--threads 0"):
        thread_budget(0)


def test_the_cli_sets_the_budget_and_passive_waiting(demo_index):
    # --model: the torch path (the index's ONNX export would answer the image query without torch)
    script = ("import os, sys\nfrom otclip.main import main\n"
              f"main(['search', {str(demo_index / 'index')!r}, '--image', {str(next((demo_index / 'data').rglob('*.jpg')))!r},"
              " '--threads', '1', '-k', '1', '--local', '--model', 'effnet-minilm'])\nimport torch\n"
              "print('THREADS', torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True, env=env)
    assert "THREADS 1 PASSIVE" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "otclip", "search", str(demo_index / "index"), "a cat", "--threads", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--threads 0" in bad.stderr and "Traceback" not in bad.stderr


def test_index_threads_reach_the_onnx_image_tower(demo_index, tmp_path):
    """`otclip index --threads 1` of a model seen before encodes through ONNX Runtime: its session gets the
    budget too (sessions made after the CLI applied it read it)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in sorted((demo_index / "data").rglob("*.jpg"))[:2]:
        (photos / photo.name).write_bytes(photo.read_bytes())
    script = ("import sys\nimport onnxruntime as ort\nfrom otclip.main import main\nseen = []\n"
              "class Spy(ort.InferenceSession):\n"
              "    def __init__(self, path, options, **kw):\n"
              "        seen.append(options.intra_op_num_threads)\n"
              "        super().__init__(path, options, **kw)\n"
              "ort.InferenceSession = Spy\n"
              f"main(['index', {str(photos)!r}, '--out', {str(tmp_path / 'ix')!r}, '--threads', '1', '--no-progress'])\n"
              "print('SESSIONS', seen, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert "SESSIONS [1] False" in out.stdout, out.stdout + out.stderr
