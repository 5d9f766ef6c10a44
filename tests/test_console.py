"""src/console.py: TensorFlow's C++ start-up noise is dropped from stderr, and nothing
else is: not the stage's own lines, not a traceback, not a real TensorFlow failure,
not what a crashing process wrote. The samples are what TensorFlow 2.21 prints here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ran_stages

from src.console import is_noise, split_noise

ROOT = Path(__file__).resolve().parents[1]

NOISE = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796148079.663728    3775 port.cc:153] oneDNN custom operations are on. You "
    b"may see slightly different numerical results due to floating-point round-off errors from "
    b"different computation orders. To turn them off, set the environment variable "
    b"`TF_ENABLE_ONEDNN_OPTS=0`.",
    b"I0000 00:00:1796148090.932045    3815 cpu_feature_guard.cc:227] This TensorFlow binary is "
    b"optimized to use available CPU instructions in performance-critical operations.",
    b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other "
    b"operations, rebuild TensorFlow with the appropriate compiler flags.",
    b"W0000 00:00:1796148090.932045    3815 cpu_allocator_impl.cc:83] Allocation of 268435456 "
    b"exceeds 10% of free system memory.",
    b"I0613 14:55:54.925839    3815 device_compiler.h:188] Compiled cluster using XLA!",
    b"E0000 00:00:1796148091.125012    3815 util.cc:131] oneDNN supports DT_INT32 only on "
    b"platforms with AVX-512. Falling back to the default Eigen-based implementation if present.",
    b"2025-08-01 13:52:25.403654: E tensorflow/core/util/util.cc:131] oneDNN supports DT_BOOL "
    b"only on platforms with AVX-512. Falling back to the default Eigen-based implementation if "
    b"present.",
    b"2025-03-11 22:30:58.742701: I tensorflow/core/util/port.cc:153] oneDNN custom operations "
    b"are on.",
]
KEPT = [
    b"error: kernel: unknown kernel 'sobel_z'; known: sobel_x, sobel_y, smiley",
    b"train: epoch 2/8 kernel_rel_error=0.031",
    b"Traceback (most recent call last):",
    b'  File "/work/main/stages/train.py", line 90, in <module>',
    b"ValueError: boom",
    b"F0000 00:00:1796148091.125012    3815 cpu_feature_guard.cc:99] The TensorFlow library was "
    b"compiled to use AVX512F instructions, but these aren't available on your machine.",
    b"E0000 00:00:1796148091.125012    3815 cuda_driver.cc:152] failed call to cuInit: INTERNAL: "
    b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    b"E0000 00:00:1796148091.125012    3815 op_kernel.cc:1840] OP_REQUIRES failed at "
    b"conv_ops.cc:1220 : RESOURCE_EXHAUSTED: OOM when allocating tensor",
    b"WARNING:tensorflow:5 out of the last 5 calls to <function f> triggered tf.function "
    b"retracing.",
    b"Info: 3 images skipped",
    b"To enable them, pass --all",
    b"",
]
# What the end-to-end checks look for: any C++ log line, or the absl preamble.
CPP_LOG = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog", re.M)


def line_id(line: bytes) -> str:
    return line[:30].decode() or "empty"


@pytest.mark.parametrize("line", NOISE, ids=line_id)
def test_noise_is_recognised(line):
    assert is_noise(line)


@pytest.mark.parametrize("line", KEPT, ids=line_id)
def test_everything_else_is_kept(line):
    assert not is_noise(line)


def test_split_forwards_the_kept_lines_in_order_unchanged():
    stream = b"\n".join([NOISE[0], KEPT[0], NOISE[1], KEPT[2], b"\xff\xfe not utf-8", NOISE[3]])
    assert split_noise(stream + b"\n") == (
        b"\n".join([KEPT[0], KEPT[2], b"\xff\xfe not utf-8"]) + b"\n",
        b"",
    )


def test_an_unfinished_line_waits_only_while_it_could_be_noise():
    assert split_noise(b"a\n\r 50%|#####     | 1/2") == (b"a\n\r 50%|#####     | 1/2", b"")
    forward, held = split_noise(b"a\n" + NOISE[1][:40])
    assert (forward, held) == (b"a\n", NOISE[1][:40])
    assert split_noise(held + NOISE[1][40:] + b"\nb\n") == (b"b\n", b"")


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -c code` from the repo root, TF_CPP_MIN_LOG_LEVEL left for the code to set."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, timeout=300, **kwargs
    )


FIT_THEN_FAIL = """
    import os, sys
    {setup}
    import keras, numpy as np, tensorflow as tf
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 3)])
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    model.fit(x, x[:, 1:-1, 1:-1], epochs=1, verbose=0)
    print("error: x", file=sys.stderr)
    raise ValueError("boom")
"""


def test_tensorflow_noise_is_hidden_but_errors_and_tracebacks_are_not():
    hidden = FIT_THEN_FAIL.format(setup="from src import console; console.hide_tensorflow_logs()")
    today = FIT_THEN_FAIL.format(setup='os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"')
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(today)], cwd=ROOT, text=True, stderr=subprocess.PIPE
    ) as control:  # alongside: TF imports slowly
        result = run_python(hidden, text=True)
        _, control_err = control.communicate(timeout=300)
    assert CPP_LOG.search(control_err), f"no noise to hide any more?\n{control_err}"

    assert result.returncode == 1
    assert not CPP_LOG.search(result.stderr), result.stderr
    lines = result.stderr.splitlines()
    assert "error: x" in lines and "Traceback (most recent call last):" in lines, result.stderr
    assert lines.index("error: x") < lines.index("Traceback (most recent call last):")
    assert lines[-1] == "ValueError: boom"


@pytest.mark.parametrize(
    "crash, signum", [("os.abort()", signal.SIGABRT), ("ctypes.string_at(0)", signal.SIGSEGV)]
)
def test_what_a_crashing_process_wrote_still_arrives(crash, signum):
    noise = b"\n".join(NOISE)
    result = run_python(f"""
        import ctypes, os
        from src import console
        console.hide_tensorflow_logs()
        os.write(2, {noise!r} + b"\\nreal 1\\n" + {noise!r} + b"\\nreal 2, unfinished")
        {crash}
    """)
    assert result.returncode == -signum
    assert result.stderr.endswith(b"real 1\nreal 2, unfinished"), result.stderr


@pytest.mark.parametrize(
    "how, code", [("user error", 2), ("ctrl-c", 130), ("sigterm", 130), ("return", 0)]
)
def test_the_filter_has_written_everything_before_the_stage_exits(tmp_path, how, code):
    # SIGTERM is turned into KeyboardInterrupt, as src/interrupts.py does during training.
    err = tmp_path / "stderr"
    with open(err, "wb") as sink:
        result = run_python(
            f"""
            import os, signal, sys
            from src import console
            from src.errors import UserError, run_stage
            import psutil
            console.hide_tensorflow_logs()
            print(psutil.Process().children()[0].pid)  # the filter

            def interrupt(signum, frame):
                raise KeyboardInterrupt

            def main():
                for i in range(20000):
                    print(f"line {{i}}", file=sys.stderr)
                signal.signal(signal.SIGTERM, interrupt)
                if {how!r} == "user error":
                    raise UserError("bad param")
                if {how!r} == "ctrl-c":
                    raise KeyboardInterrupt
                if {how!r} == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)

            run_stage(main)
        """,
            stderr=sink,
            text=True,
        )
        written = err.read_text().splitlines()  # at once: nothing may still be on its way
    assert result.returncode == code
    lines = [line for line in written if line.startswith("line ")]
    assert lines == [f"line {i}" for i in range(20000)]
    last = {"user error": "error: bad param", "return": "line 19999"}.get(how, "error: interr")
    assert written[-1].startswith(last)
    with pytest.raises(ProcessLookupError):  # waited for and reaped, not left behind
        os.kill(int(result.stdout), 0)


def test_a_second_call_does_nothing_and_the_log_level_defaults_to_2():
    result = run_python(
        """
        import os, psutil
        from src import console
        console.hide_tensorflow_logs()
        console.hide_tensorflow_logs()
        print(len(psutil.Process().children()), os.environ["TF_CPP_MIN_LOG_LEVEL"])
    """,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["1", "2"]


def test_dvc_repro_prints_no_tensorflow_noise(workspace):
    result = workspace.dvc("repro")
    assert {"train", "visualize"} <= set(ran_stages(result.stdout))
    for name, text in (("stderr", result.stderr), ("stdout", result.stdout)):
        found = CPP_LOG.search(text)
        assert not found, f"{name} has TensorFlow noise: {found.group(0)!r}\n{text[-3000:]}"
        assert "/step" not in text, f"{name} has a Keras progress bar\n{text[-3000:]}"
