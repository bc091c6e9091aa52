"""The README's picture of the panel (`examples.llm_platform.screenshot`) can be made again."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from examples.llm_platform.screenshot import main

from ..browser_support import chromium_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(180)  # the scenario three times, a server process and a browser
def test_the_screenshot_shows_the_examples_panel_1200_wide(tmp_path: Path) -> None:
    chromium_path()
    picture = tmp_path / "panel.png"

    main([str(picture)])

    png = picture.read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width == 1200 and 200 < height <= 800
