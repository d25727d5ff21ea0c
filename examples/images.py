"""An image built from code (#11): the Podman executor builds it once, on first use.

gpud image build examples/images.py::image      # ahead of time (optional)
gpud run examples/images.py::naturalsize --n 123456789
"""

import gpud_client as gpud

image = gpud.Image.base("localhost/gpud-python:3.11").pip_install("humanize==4.*")


@gpud.function(image=image)
def naturalsize(n: int) -> str:
    import humanize  # in the image, not necessarily in the caller's environment

    return humanize.naturalsize(n)


if __name__ == "__main__":
    print(naturalsize.remote(123456789))
