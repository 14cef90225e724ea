"""SIGTERM to a sweep's driver unwinds like Ctrl-C, also after `ray.init` (which installs Ray's own
C++ SIGTERM handler: a stack dump and no clean stop)."""
import os
import signal
import subprocess
import sys
import textwrap


def test_sigterm_after_ray_init_reaches_the_drivers_python_handler(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, time
        from harness.errors import Terminated
        def on_term(signum, frame):
            raise Terminated()
        signal.signal(signal.SIGTERM, on_term)
        from harness.sweep.ray_runtime import ray_session
        try:
            with ray_session(None, 1, {str(tmp_path)!r}):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
                print("not interrupted")
        except Terminated:
            print("terminated cleanly")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert "terminated cleanly" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "SIGTERM received" not in out.stderr        # Ray's C++ handler did not take it
