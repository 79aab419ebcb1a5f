"""Only for a worker that a test starts with this folder on its PYTHONPATH: the process that
decodes an image of the size in ``SEARCHSVC_TEST_POISON_SIZE`` (``WxH``) dies of SIGKILL, as
under the kernel's out-of-memory killer or a segfault in a decoder."""

from __future__ import annotations

import os
import signal

_size = os.environ.get("SEARCHSVC_TEST_POISON_SIZE", "")
if _size:
    from typing import Any

    from PIL import ImageOps

    _poison = tuple(int(side) for side in _size.split("x"))
    _real_exif_transpose = ImageOps.exif_transpose

    def _exif_transpose(image: Any, **kwargs: Any) -> Any:
        if tuple(image.size) == _poison:
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_exif_transpose(image, **kwargs)

    ImageOps.exif_transpose = _exif_transpose
