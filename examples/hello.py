"""The one-minute tour: `gpud run examples/hello.py::square --x 7` prints 49.

Or from Python: `python examples/hello.py` runs every way of calling a function.
"""

import gpud_client as gpud

app = gpud.App("hello")


@app.function()
def square(x: int) -> int:
    """Square a number, on the daemon's box."""
    print(f"squaring {x}")
    return x * x


@app.function(gpu="any", timeout="10m")
def where_am_i() -> dict:
    """Which GPU did this job get? (CUDA_VISIBLE_DEVICES holds its UUID)."""
    import os
    import socket

    return {"host": socket.gethostname(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


@app.function(retries=0)
def fail(message: str = "bad") -> None:
    """Raise remotely; the caller gets a ValueError with the remote traceback."""
    raise ValueError(message)


if __name__ == "__main__":
    print(square.remote(7))  # 49, with the job's output on stderr
    job = square.spawn(8)  # returns at once
    print(job.id, job.get())  # 64
    print(list(square.map(range(10))))  # [0, 1, 4, ..., 81], in input order
    print(where_am_i.remote())
    try:
        fail.remote("bad")
    except ValueError as e:
        print("remote ValueError:", e)
