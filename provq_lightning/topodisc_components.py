"""TopoDisc's component labels, shared by the model (per-component metrics) and the datamodule
(which draws the points); a core module, so the model never imports the datamodules."""

from __future__ import annotations

DISK, TRIANGLE = 0, 1
COMPONENT_NAMES = {DISK: "disk", TRIANGLE: "triangle"}
