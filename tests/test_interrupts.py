"""qkv_vit/interrupts.py: SIGTERM and SIGINT stop a process wherever Python happens to run their handler."""

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

# A signal handled inside a gc callback, as it is when it lands in JAX's _xla_gc_callback during a collection:
# Python cannot raise the Interrupted there, so without the re-delivery the program would go on.
SIGNAL_IN_GC_CALLBACK = textwrap.dedent(
    """
    import gc, os, signal, sys, time
    from qkv_vit.interrupts import Interrupted, stop_on_signals

    stop_on_signals()
    sent = []

    def callback(phase, info):
        if phase == "start" and not sent:
            sent.append(True)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))  # its handler runs before this callback returns

    gc.callbacks.append(callback)
    try:
        gc.collect()
        time.sleep(10)  # the signal sent again arrives in here
        print("went on")
    except Interrupted as stop:
        print("stopped by", stop.signal_name, "code", stop.code)
    """
)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_handled_in_a_gc_callback_still_stops_the_program(signal_name):
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_GC_CALLBACK, signal_name], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == f"stopped by {signal_name} code 143", result.stdout + result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_other_unraisable_exceptions_still_reach_the_previous_hook():
    script = textwrap.dedent(
        """
        import sys
        from qkv_vit.interrupts import stop_on_signals

        seen = []
        sys.unraisablehook = lambda unraisable: seen.append(type(unraisable.exc_value).__name__)
        stop_on_signals()
        stop_on_signals()  # twice, as main.py does: the hook is not wrapped around itself

        class Broken:
            def __del__(self):
                raise ValueError("in a finalizer")

        Broken()
        print(seen)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "['ValueError']", result.stdout + result.stderr
