"""Model backends: a checkpoint and its tokenizer loaded (PyTorch), or exported and run by ONNX
Runtime. They import only the shared ground: no stage, engine or quality tool."""
