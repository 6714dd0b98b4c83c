"""Inference on a device: run an exported model (.tflite or .onnx) with whichever runtime is installed."""
