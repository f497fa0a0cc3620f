import io

import pytest


def solid_png(width, height, rgb):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def png():
    """PNG bytes of a solid image: png(width, height, rgb)."""
    return solid_png
