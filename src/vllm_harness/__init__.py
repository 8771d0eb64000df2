"""vllm_harness: build or install vLLM for a chosen CUDA variant, check the machine first, explain
failures, and verify the result on the GPU.  The noxfile and tasks.py are thin callers of ``cli``."""

__version__ = "0.1.0"
