"""Model compression: post-training weight quantization with calibration reports."""
