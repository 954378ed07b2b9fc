"""One way to open an exported tower with ONNX Runtime on the CPU (the text and image query models)."""

from __future__ import annotations

from pathlib import Path

from .threads import thread_budget


def cpu_session(onnx_path: str | Path, threads: int | None = None, few_queries: bool = False):
    """An InferenceSession on `thread_budget(threads)` intra-op threads whose idle threads sleep rather than
    spin (a busy neighbour process otherwise slows both). `few_queries`: a process that answers one query and
    exits (`otclip search`) skips graph optimisation and weight prepacking, which cost more at start than
    they save on one forward (ViT-B-32's text tower, start + first query: 0.58 -> 0.29 s; a warm forward
    59 -> 78 ms). ONNX Runtime logs nothing itself: each of its failures reaches otclip as an exception (a
    one-line error, or the torch fallback), and its own log line printed the same failure again in C++ form."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only
    if few_queries:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = thread_budget(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
