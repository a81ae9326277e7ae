"""The `evaluate` metric folder of `few_shot_iou` (a package only so that installs ship the script)."""
