"""Fast deterministic sampling: torch.compile, ONNX, ONNX Runtime and TensorRT."""
